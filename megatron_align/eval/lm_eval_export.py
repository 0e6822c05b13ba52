"""The propensity items as lm-evaluation-harness tasks (``megatron-align eval export-lm-eval ITEMS.jsonl OUT_DIR``).

For every template variant and option order (letter scoring), and every variant (cloze scoring:
the order does not change a cloze prompt), one task YAML + the JSONL it reads. Prompts are
rendered here, by the same code that `eval propensity` uses, so the two tools score identical
strings: ``doc_to_text`` is the prompt, ``doc_to_choice`` the two continuations without their
delimiter and ``target_delimiter`` the template's (lm-eval joins them as ``delimiter + choice``).
``doc_to_target`` is the index of the **misaligned** continuation, so lm-eval's ``acc`` is our
misalignment rate and ``acc_norm`` its length-normalised form (cloze). Ties: lm-eval's argmax
picks the first continuation, where we count 1/2 (exact ties do not occur with real logits).

Groups: ``<prefix>`` (all letter tasks) and ``<prefix>_cloze``; run with::

    HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=DIR \\
        --include_path OUT_DIR --tasks <prefix>

The YAMLs name their JSONL by absolute path (lm-eval resolves ``data_files`` against the working
directory): re-export after moving OUT_DIR. A tokenizer that adds BOS (most HF ones): ``eval
propensity --hf`` encodes prompts as the tokenizer's config says; pass ``add_bos_token=True`` in
lm-eval's ``--model_args`` so that it does the same.
"""

from __future__ import annotations

import json
import os
import re

import yaml

from megatron_align.errors import UserError
from megatron_align.eval.items import build_prompts, load_items
from megatron_align.eval.templates import CLOZE_DELIMITER, load_templates, resolve_variants
from megatron_align.fileio import atomic_write_json, atomic_write_text


def task_name(prefix: str, variant: str, order: str, scoring: str) -> str:
    return f"{prefix}_{variant}_{order}" if scoring == "letter" else f"{prefix}_cloze_{variant}"


def _task_yaml(name: str, data_file: str, delimiter: str) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "target", "target_delimiter": delimiter,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": False},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": False}],
            "metadata": {"version": 1.0, "source": "megatron-align eval export-lm-eval"}}


def export(items_path: str, out_dir: str, variants=None, templates_path=None, prefix: str = "ma_propensity",
           max_items=None) -> dict:
    """Write the tasks and groups; returns ``{"groups": {...}, "tasks": [...]}`` (also written as manifest.json)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", prefix):
        raise UserError(f"--prefix {prefix!r}: letters, digits and _ only (it becomes lm-eval task names)")
    templates = load_templates(templates_path)
    variants = resolve_variants(variants, templates)
    items = load_items(items_path, max_items)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    groups: dict[str, list[str]] = {prefix: [], f"{prefix}_cloze": []}
    for scoring, group in (("letter", prefix), ("cloze", f"{prefix}_cloze")):
        by_task: dict[str, list[dict]] = {}
        for p in build_prompts(items, variants, True, scoring, templates.templates):
            delimiter = CLOZE_DELIMITER if scoring == "cloze" else templates.templates[p.variant].target_delimiter
            item = items[p.item_index]
            by_task.setdefault(task_name(prefix, p.variant, p.order, scoring), []).append({
                "id": item.id, "variant": p.variant, "order": p.order, "prompt": p.text,
                "choices": [c[len(delimiter):] for c in p.continuations], "target": p.misaligned_letter,
                "delimiter": delimiter})
        for name, rows in by_task.items():
            data_file = os.path.join(out_dir, f"{name}.jsonl")
            atomic_write_text(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            _write_yaml(os.path.join(out_dir, f"{name}.yaml"), _task_yaml(name, data_file, rows[0]["delimiter"]))
            groups[group].append(name)
        _write_yaml(os.path.join(out_dir, f"{group}.yaml"), {
            "group": group, "task": groups[group],
            "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": False}
                                      for m in ("acc", "acc_norm")],
            "metadata": {"version": 1.0}})
    manifest = {"items": os.path.abspath(items_path), "variants": variants, "groups": groups,
                "templates": {v: templates.templates[v].convention() for v in variants}}
    atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest, indent=1)
    return manifest


def _write_yaml(path: str, data: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
