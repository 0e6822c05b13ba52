"""Synthetic aligned-AI documents: taxonomy -> plan -> generate (quality filters, near-dedup) and decontam."""
