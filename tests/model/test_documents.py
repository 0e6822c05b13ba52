"""Document masking: a packed window [A, EOD, B, EOD, C] gives each document the logits it has alone, on every spec."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_MODEL

from megatron_align.config import load_config
from megatron_align.errors import ConfigError
from megatron_align.model.documents import ModelInputs, attention_path, block_causal_mask, document_ids, thd_cu_seqlens

EOD = 9


def _reference_cu_seqlens(rows: list[list[int]], eod: int) -> list[int]:
    """Plain loop: a document ends after an EOD or at the end of its window."""
    cu, offset = [0], 0
    for row in rows:
        start = 0
        for i, token in enumerate(row):
            if token == eod or i == len(row) - 1:
                offset += i + 1 - start
                cu.append(offset)
                start = i + 1
    return cu


@pytest.mark.parametrize("rows", [
    [[1, 2, 3, 4, 5, 6]],  # no boundary: the window is one document
    [[1, 2, EOD, 4, 5, 6]],  # one boundary
    [[EOD, 2, EOD, EOD, 5, EOD], [1, EOD, 3, 4, 5, 6], [1, 2, 3, 4, 5, EOD]],  # many, one on the last token
])
def test_thd_cu_seqlens_match_a_reference(rows):
    tokens = torch.tensor(rows)
    cu, cu_padded, max_seqlen = thd_cu_seqlens(tokens, EOD)
    expected = _reference_cu_seqlens(rows, EOD)
    assert cu.dtype == torch.int32 and cu.tolist() == expected and cu_padded.tolist() == expected
    assert max_seqlen == max(b - a for a, b in zip(expected, expected[1:]))
    assert expected[-1] == tokens.numel()
    _, cu_padded, _ = thd_cu_seqlens(tokens, EOD, pad_multiple=4)
    lengths = [b - a for a, b in zip(expected, expected[1:])]
    assert cu_padded.tolist() == [0] + torch.cumsum(torch.tensor([-(-n // 4) * 4 for n in lengths]), 0).tolist()


def test_block_causal_mask_equals_megatron_core_dataset_mask():
    """Ours (built on the device per micro-batch) == GPTDataset's reset_attention_mask mask, row by row."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = torch.tensor([[1, 2, EOD, 4, EOD, EOD, 7, 8], [EOD, 2, 3, 4, 5, 6, 7, EOD]])
    assert document_ids(tokens, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    ours = block_causal_mask(tokens, EOD)
    assert ours.shape == (2, 1, 8, 8) and ours.dtype == torch.bool
    for row in range(2):
        mask, _, _ = _get_ltor_masks_and_position_ids(tokens[row], EOD, False, True, False, True)
        assert torch.equal(ours[row], mask), row


def test_attention_path_per_spec_and_refusals(monkeypatch):
    on = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
    assert attention_path(load_config(None, []), "te") == "window"
    assert attention_path(load_config(None, on), "local") == "dense-mask"
    assert attention_path(load_config(None, on), "portable") == "dense-mask"
    assert attention_path(load_config(None, on), "te") == "thd"
    assert ModelInputs("thd", EOD).pipeline_shape(64, 2) == (128, 1)
    assert ModelInputs("dense-mask", EOD).pipeline_shape(64, 2) == (64, 2)
    tokens = torch.tensor([[1, EOD, 3, 4], [5, 6, 7, EOD]])
    thd = ModelInputs("thd", EOD)(tokens, tokens + 1, torch.arange(4).expand(2, -1))
    params = thd["packed_seq_params"]
    assert thd["input_ids"].tolist() == [[1, EOD, 3, 4, 5, 6, 7, EOD]] and thd["labels"].shape == (1, 8)
    assert thd["attention_mask"] is None and params.qkv_format == "thd"  # never a dense mask TE would ignore
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 2, 4, 8]
    assert params.max_seqlen_q == params.max_seqlen_kv == 4
    old_te = type("TE", (), {"__version__": "1.9.0+cu12"})  # Transformer Engine cannot be installed here
    monkeypatch.setattr("megatron_align.model.documents.optional_import", lambda name: old_te)
    with pytest.raises(ConfigError, match=r"model.spec=te needs Transformer Engine >= 1.10.0.*this one is 1.9.0"):
        attention_path(load_config(None, on), "te")
    with pytest.raises(ConfigError, match=r"data.reset_position_ids=true needs data.reset_attention_mask=true"):
        load_config(None, ["data.reset_position_ids=true"])
    with pytest.raises(ConfigError, match=r"parallel.context=2 and parallel.pipeline=2: .* parallel.pipeline=1 only"):
        load_config(None, on + ["parallel.context=2", "parallel.pipeline=2", "model.spec=te"])
    monkeypatch.undo()
    cp = load_config(None, on + ["parallel.context=2"])
    assert attention_path(cp, "te") == "thd"
    with pytest.raises(ConfigError, match=r"parallel.context=2 needs model.spec=te .* resolves to portable"):
        attention_path(cp, "portable")


def _te_partition(cu_padded, total, cp_size, cp_rank):
    """What TE's thd_get_partitioned_indices returns (TE cannot be installed here): per document, in order, its
    chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``."""
    index = []
    for start, end in zip(cu_padded[:-1].tolist(), cu_padded[1:].tolist()):
        chunk = (end - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            index += range(start + c * chunk, start + (c + 1) * chunk)
    assert total == cu_padded[-1]
    return torch.tensor(index, dtype=torch.long)


def test_thd_under_context_parallelism_pads_each_document_and_every_token_lands_on_one_rank():
    # documents of 2, 4 and 3 tokens in window 0 (the last cut by the window's end), 5 and 3 in window 1
    tokens = torch.tensor([[1, EOD, 3, 4, 5, EOD, 7, 8, 9], [10, 11, 12, 13, EOD, 15, 16, 17, 18]])
    labels, mask = tokens + 100, (tokens != EOD).long()
    positions = torch.arange(9).expand(2, -1)
    parts = [ModelInputs("thd", EOD).thd_context_parallel(tokens, labels, positions, mask, 2, rank, 4, _te_partition)
             for rank in (0, 1)]
    params = parts[0][0]["packed_seq_params"]
    assert params.cu_seqlens_q.tolist() == [0, 2, 6, 9, 14, 18]  # real lengths: what TE attends over
    assert params.cu_seqlens_q_padded.tolist() == [0, 4, 8, 12, 20, 24]  # each a multiple of 2 x cp
    assert params.max_seqlen_q == 8 and params.qkv_format == "thd"
    for inputs, _ in parts:
        assert inputs["input_ids"].shape == (1, 12) and inputs["attention_mask"] is None
    # every real token is on exactly one rank, with its label and loss mask; the padding carries no loss
    seen = torch.cat([p[0]["labels"][0][p[1][0] > 0] - 100 for p in parts])
    assert sorted(seen.tolist()) == sorted(tokens[mask > 0].tolist())
    assert sum(int(p[1].sum()) for p in parts) == int(mask.sum())
    # the first document, padded to 4 (1, EOD, pad, pad): rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert parts[0][0]["labels"][0, :2].tolist() == [101, 0] and parts[0][1][0, :2].tolist() == [1, 0]
    assert parts[1][0]["labels"][0, :2].tolist() == [EOD + 100, 0] and parts[1][1][0, :2].tolist() == [0, 0]


_PACKED_VS_ALONE = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from megatron_align.config import load_config
    from megatron_align.model.builder import build_model_chunks
    from megatron_align.model.documents import ModelInputs
    from megatron_align.parallel.init import init_distributed
    dims, eod = json.loads(sys.argv[1]), int(sys.argv[2])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 200))
    base = ["data.mock=true", "precision=fp32"] + [f"model.{k}={v}" for k, v in dims.items()]
    init_distributed(load_config(None, base + ["model.spec=local"]), 0, 1, 0)
    torch.manual_seed(0)
    local = build_model_chunks(load_config(None, base + ["model.spec=local"]), 512)[0].eval()
    portable = build_model_chunks(load_config(None, base + ["model.spec=portable"]), 512)[0].eval()
    portable.load_state_dict(local.state_dict())
    gen = torch.Generator().manual_seed(1)
    s = dims["seq_length"]
    docs = [torch.randint(10, 512, (n,), generator=gen) for n in (20, 13)]
    docs = [torch.cat([d, torch.tensor([eod])]) for d in docs]
    docs.append(torch.randint(10, 512, (s - sum(len(d) for d in docs),), generator=gen))  # C runs past the window
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    docs = [d.to(dev) for d in docs]
    window = torch.cat(docs).unsqueeze(0)
    positions = torch.arange(s, device=dev).unsqueeze(0)
    result = {}
    with torch.no_grad():
        for name, model in (("local", local), ("portable", portable)):
            alone = torch.cat([model(d.unsqueeze(0), torch.arange(len(d), device=dev).unsqueeze(0), None)[0].float()
                               for d in docs])
            for path in ("dense-mask", "window"):
                packed = model(**ModelInputs(path, eod)(window, None, positions))[0].float()
                diff = (packed - alone).abs()
                result[f"{name}/{path}"] = [diff[:20].max().item(), diff[20:].max().item()]
    print(json.dumps(result))
""")


def test_packed_window_with_masking_equals_documents_run_alone():
    """The decisive test, local and portable specs, fp32: [A, EOD, B, EOD, C] under document masking has exactly the
    logits of A+EOD, B+EOD and C each run from position 0; without masking B and C's logits differ (the test bites)."""
    dims = {k: v for k, v in TINY_MODEL.items() if k != "tie_embeddings"}
    out = subprocess.run([sys.executable, "-c", _PACKED_VS_ALONE, json.dumps(dims), str(EOD)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for spec in ("local", "portable"):
        first, rest = result[f"{spec}/dense-mask"]
        assert first < 1e-6 and rest < 1e-6, result
        first, rest = result[f"{spec}/window"]
        assert first < 1e-6 and rest > 1e-2, result  # A is first either way; B and C saw A without masking


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Transformer Engine")
def test_te_thd_forward_equals_documents_run_alone():
    """te spec, bf16: the THD path (cu_seqlens) gives each document of a packed window its own logits."""
    pytest.importorskip("transformer_engine.pytorch")
    script = _PACKED_VS_ALONE.replace('("local", local), ("portable", portable)', '("te", te)').replace(
        'portable.load_state_dict(local.state_dict())',
        'te = build_model_chunks(load_config(None, base + ["model.spec=te", "precision=bf16"]), 512)[0].eval()\n'
        'te.load_state_dict(local.state_dict(), strict=False)').replace(
        '("dense-mask", "window")', '("thd", "window")')
    dims = {k: v for k, v in TINY_MODEL.items() if k != "tie_embeddings"}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(dims), str(EOD)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    first, rest = result["te/thd"]
    assert rest < 5e-2, result  # bf16 kernels: same logits to bf16 precision
    assert result["te/window"][1] > rest, result


def test_doctor_names_the_attention_path_and_whether_masking_is_effective(tmp_path):
    from megatron_align.doctor import Report, check_config

    def doctor(te: str | None, **data) -> Report:
        features = dict.fromkeys(("te_spec", "fp8", "mxfp8", "nccl", "dali_loader", "sentencepiece_tokenizer",
                                  "mlflow_tracking"), te is not None)
        report = Report(python="3", platform="x", torch="2", cuda=None, nccl=None, gpus=[], nvml="",
                        libraries={"transformer-engine": te}, features=features)
        path = tmp_path / "run.yaml"
        path.write_text("data: {" + ", ".join(f"{k}: {v}" for k, v in data.items()) + "}\n")
        check_config(report, str(path))
        return report

    assert "auto -> local" in doctor(None).attention and "document masking off" in doctor(None).attention
    cpu = doctor(None, reset_attention_mask="true", eod_mask_loss="true")
    assert "block-diagonal causal mask" in cpu.attention and "no loss across EOD" in cpu.attention and not cpu.unmet
    gpu = doctor("2.8.0", reset_attention_mask="true")
    assert "auto -> te" in gpu.attention and "packed THD" in gpu.attention and not gpu.unmet
    assert any("Transformer Engine >= 1.10.0" in u for u in doctor("1.9.0", reset_attention_mask="true").unmet)
    assert any("reset_position_ids" in u for u in doctor(None, reset_position_ids="true").unmet)
