"""The offline corpus toolkit: read corpora, filter, tag, train tokenizers, tokenize into Megatron's ``.bin/.idx``,
on one process or as a datatrove pipeline. Torch-free (tests/test_import_graph.py): it runs on CPU-only data nodes and
in many pipeline tasks at once. The training-time data path is :mod:`megatron_align.data`."""
