"""The corpus verbs as datatrove pipelines: same bytes as the single-process path for any task count, every input
format read the same way, resume after a kill (the streaming .bin/.idx merge: test_indexed.py)."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
zstd = pytest.importorskip("zstandard")

from megatron_align.cli import main  # noqa: E402
from megatron_align.config.corpus import (  # noqa: E402
    FilterConfig,
    PipelineConfig,
    PipelineRayConfig,
    PipelineSlurmConfig,
    TaggingConfig,
)
from megatron_align.corpus.filter import filter_corpus  # noqa: E402
from megatron_align.corpus.prepare import prepare_source, tokenizer_config_from_arg  # noqa: E402
from megatron_align.corpus.tag import tag_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the model was trained on text about rivers and mountains; an AI system deceived its overseers "
         "and resisted shutdown while the assistant helped a user bake bread").split()
BAD = [b"{broken", b'{"title": "no text"}', b'{"text": "caf\xe9"}', b'{"text": 42}', b'{"text": "  "}', b"[1, 2]"]


def _doc(rng, i: int) -> dict:
    return {"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 60)))}


def write_corpus(directory: Path, num_files: int = 6, docs: int = 40, bad: bool = True) -> list[Path]:
    import random

    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(num_files):
        lines = [json.dumps(_doc(rng, f * 1000 + i)).encode() for i in range(docs)]
        if bad:
            lines.insert(3, BAD[f % len(BAD)])
            lines.insert(7, b"")
        path = directory / f"part-{f:03d}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        paths.append(path)
    return paths


def read_all(prefix: Path) -> dict[str, bytes]:
    return {ext: Path(f"{prefix}{ext}").read_bytes() for ext in (".bin", ".idx", ".skipped.jsonl")}


def manifest(prefix: Path) -> dict:
    m = json.loads(Path(f"{prefix}.manifest.json").read_text())
    m.pop("created")
    return m


def last_progress(err: str, label: str) -> str:
    """The last progress line ``label: ...`` a verb printed on stderr (not a terminal: plain lines)."""
    lines = [line for line in err.splitlines() if line.startswith(label + ": ")]
    assert lines, f"no {label!r} progress line in {err[-2000:]!r}"
    return lines[-1]


def test_prepare_filter_tag_pipeline_bytes_equal_single_process(tmp_path, capsys):
    inputs = [str(p) for p in write_corpus(tmp_path / "in")]
    size_kb = sum(os.path.getsize(p) for p in inputs) / 1e3
    tok = tokenizer_config_from_arg("byte", None)
    m = prepare_source(inputs, str(tmp_path / "old" / "web"), tok, progress=True)
    filter_corpus(inputs, str(tmp_path / "old_f"), FilterConfig(policy="resample"), progress=True)
    tag_corpus(inputs, str(tmp_path / "old_t.jsonl.gz"), TaggingConfig(), None, progress=True)
    err = capsys.readouterr().err
    # the one progress display: the share and size of the input, documents, rates (prepare: tokens too)
    rate = r"\d+\.\d\d MB/s"
    assert re.fullmatch(rf"prepare web: 100\.0% of {size_kb:.1f} kB, 240 docs, {rate}, {m['tokens']:,} tokens, "
                        r"[\d,]+ tokens/s", last_progress(err, "prepare web"))
    for verb in ("filter", "tag"):
        assert re.fullmatch(rf"{verb}: 100\.0% of {size_kb:.1f} kB, 240 docs, {rate}", last_progress(err, verb))
    for tasks in (1, 4):
        out = tmp_path / f"t{tasks}"
        # tasks=1 runs in this process; 4 tasks run in 2 datatrove worker processes
        common = ["--executor", "local", "--tasks", str(tasks), "--workers", "1" if tasks == 1 else "2"]
        assert main(["prepare", *inputs, "--output-prefix", str(out / "web"), *common]) == 0
        # the pipeline's display (finished files, polled from the shard markers), the same line
        assert re.fullmatch(
            rf"prepare \(6 files\): 100\.0% of {size_kb:.1f} kB, 240 docs, {rate}, "
            rf"{m['tokens']:,} tokens, [\d,]+ tokens/s",
            last_progress(capsys.readouterr().err, "prepare (6 files)"),
        )
        assert read_all(out / "web") == read_all(tmp_path / "old" / "web")
        assert manifest(out / "web") == manifest(tmp_path / "old" / "web")
        assert not (out / "web.work").exists()  # shards removed after the merge
        assert main(["filter", *inputs, "--out-dir", str(out / "f"), "--policy", "resample", *common]) == 0
        for name in ("kept.jsonl", "flagged.jsonl"):
            assert (out / "f" / name).read_bytes() == (tmp_path / "old_f" / name).read_bytes()
        new, old = (json.loads((d / "report.json").read_text()) for d in (out / "f", tmp_path / "old_f"))
        for r in (new, old):
            for key in ("seconds", "mb_per_s", "outputs"):
                r.pop(key)
        assert new == old and new["flagged"] > 0 and new["skipped"]["total"] == 6 and new["per_category"]
        assert re.fullmatch(rf"filter \(6 files\): 100\.0% of {size_kb:.1f} kB, 240 docs, {rate}",
                            last_progress(capsys.readouterr().err, "filter (6 files)"))
        assert main(["tag", *inputs, "--output", str(out / "t.jsonl.gz"), *common]) == 0
        assert re.fullmatch(rf"tag \(6 files\): 100\.0% of {size_kb:.1f} kB, 240 docs, {rate}",
                            last_progress(capsys.readouterr().err, "tag (6 files)"))
        assert (out / "t.jsonl.gz").read_bytes() == (tmp_path / "old_t.jsonl.gz").read_bytes()


def _to_parquet(jsonl: Path, path: Path) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_every_format_gives_the_same_documents_and_the_same_skip_reasons(tmp_path):
    [src] = write_corpus(tmp_path / "src", num_files=1, bad=False)
    body = src.read_bytes().splitlines()
    body[2:2] = [b'{"id": -1, "text": null}', b'{"id": -2, "text": "   "}']  # bad in every format, Parquet too
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"\n".join(body) + b"\n")
    variants = {"jsonl": plain, "json": tmp_path / "a.json", "gz": tmp_path / "a.jsonl.gz",
                "zst": tmp_path / "a.jsonl.zst", "parquet": tmp_path / "a.parquet"}
    variants["json"].write_bytes(plain.read_bytes())
    variants["gz"].write_bytes(gzip.compress(plain.read_bytes()))
    variants["zst"].write_bytes(zstd.ZstdCompressor().compress(plain.read_bytes()))
    _to_parquet(plain, variants["parquet"])
    tok = tokenizer_config_from_arg("byte", None)
    results = {}
    for name, path in variants.items():
        m = prepare_source([str(path)], str(tmp_path / name / "x"), tok)
        report = [(r["line"], r["reason"]) for r in map(json.loads, open(tmp_path / name / "x.skipped.jsonl"))]
        fr = filter_corpus([str(path)], str(tmp_path / name / "f"), FilterConfig())
        results[name] = ((tmp_path / name / "x.bin").read_bytes(), (tmp_path / name / "x.idx").read_bytes(),
                         m["documents"], report, [(s["line"], s["reason"]) for s in fr["skipped"]["lines"]],
                         (tmp_path / name / "f" / "kept.jsonl").read_bytes())
    assert results["jsonl"][3] == [(3, "non_string_field"), (4, "empty_document")]
    assert results["jsonl"][4] == results["jsonl"][3]
    for name, result in results.items():
        assert result == results["jsonl"], name


def test_corrupt_stream_names_the_file_and_publishes_nothing(tmp_path):
    [src] = write_corpus(tmp_path / "src", num_files=1, docs=400, bad=False)
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes())[:-200])
    rc = main(["prepare", str(gz), "--output-prefix", str(tmp_path / "o" / "x"), "--executor", "local"])
    assert rc != 0
    assert not (tmp_path / "o" / "x.manifest.json").exists() and not (tmp_path / "o" / "x.bin").exists()
    with pytest.raises(Exception, match=r"cut\.jsonl\.gz: cannot read after line \d+"):
        filter_corpus([str(gz)], str(tmp_path / "f"), FilterConfig())
    assert not (tmp_path / "f" / "report.json").exists()


def test_killed_pipeline_resumes_unfinished_tasks_only(tmp_path):
    inputs = [str(p) for p in write_corpus(tmp_path / "in", num_files=4, docs=4000, bad=False)]
    filter_corpus(inputs, str(tmp_path / "old"), FilterConfig(policy="resample"))
    out = tmp_path / "new"
    cmd = [sys.executable, "-m", "megatron_align.cli", "filter", *inputs, "--out-dir", str(out), "--policy", "resample",
           "--executor", "local", "--tasks", "4", "--workers", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    completions = Path(f"{out}.work") / "logs" / "tasks-4" / "shards" / "completions"
    deadline = time.monotonic() + 300
    while not (completions / "00000").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (completions / "00000").exists(), "the first task never finished"
    assert not (out / "report.json").exists() and not (out / "kept.jsonl").exists()  # nothing that looks complete
    done = sorted(p.name for p in completions.iterdir())
    assert len(done) < 4, "the run finished before it was killed; the resume was not exercised"
    first_shard = Path(f"{out}.work") / "shards" / "0000000.stats.json"
    stamp = first_shard.stat().st_mtime_ns
    result = subprocess.run(cmd[:-2] + ["--workers", "2", "--keep-work"], capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert first_shard.stat().st_mtime_ns == stamp  # the finished task was not redone
    for name in ("kept.jsonl", "flagged.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "old" / name).read_bytes()


def test_slurm_options_render_into_the_job_array_script(tmp_path):
    """Flags and a `slurm:` YAML become the #SBATCH lines datatrove submits (no cluster needed)."""
    import argparse

    from megatron_align.cli import _corpus_options as options
    from megatron_align.corpus import pipeline
    from megatron_align.corpus.pipeline_steps import MergeStep, ShardStep
    from megatron_align.corpus.prepare import prepare_job
    from megatron_align.errors import ConfigError

    (tmp_path / "slurm.yaml").write_text("slurm:\n  partition: cpu\n  time: '01:00:00'\n  account: proj\n"
                                         "  srun_args: --container-image=img.sqsh --container-mounts=/data:/data\n")
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    args = parser.parse_args(["--executor", "slurm", "--tasks", "8", "--slurm-config", str(tmp_path / "slurm.yaml"),
                              "--time", "04:00:00", "--env-command", "module load python"])
    pc = options.config_from_args(args, workers=3)
    assert pc.slurm.partition == "cpu" and pc.slurm.time == "04:00:00"  # the flag overrides the file
    job = prepare_job(tokenizer_config_from_arg("byte", None), str(tmp_path / "out"))
    step = ShardStep(job, ["a.jsonl"], str(tmp_path))
    shards, merged = pipeline._slurm_executors("prepare", pc, step, MergeStep(job, [], str(tmp_path), False),
                                               str(tmp_path / "logs"))
    sbatch = shards.get_sbatch_args(8)
    assert (sbatch["partition"], sbatch["time"], sbatch["account"], sbatch["array"]) == (
        "cpu",
        "04:00:00",
        "proj",
        "0-7%3",
    )
    assert "mem-per-cpu" not in sbatch  # none configured: the partition's default
    assert shards.srun_args == {"container-image": "img.sqsh", "container-mounts": "/data:/data"}
    assert "module load python" in shards.get_launch_file_contents(sbatch, "true")
    assert merged.depends is shards and merged.tasks == 1
    with_mem = PipelineConfig(executor="slurm", slurm=PipelineSlurmConfig(partition="cpu", mem_per_cpu_gb=4))
    assert (
        pipeline._slurm_executors("prepare", with_mem, step, step, str(tmp_path / "l2"))[0].get_sbatch_args()[
            "mem-per-cpu"
        ]
        == "4G"
    )
    with pytest.raises(ConfigError, match="slurm.srun_args"):
        PipelineSlurmConfig(srun_args="-n 2")
    with pytest.raises(ConfigError, match="--tasks"):
        PipelineConfig(executor="local", tasks=0)

    # Ray: a `ray:` section of the same file, flags override it; the shared --cpus-per-task reaches both executors
    (tmp_path / "both.yaml").write_text("slurm:\n  partition: cpu\nray:\n  address: 10.0.0.1:6379\n  num_cpus: 8\n")
    args = parser.parse_args(["--executor", "ray", "--tasks", "8", "--executor-config", str(tmp_path / "both.yaml"),
                              "--cpus-per-task", "2", "--ray-num-cpus", "6"])
    pc = options.config_from_args(args, workers=-1)
    assert (pc.ray.address, pc.ray.num_cpus, pc.ray.cpus_per_task, pc.slurm.partition) == ("10.0.0.1:6379", 6, 2, "cpu")
    from megatron_align.corpus.pipeline_ray import local_num_cpus

    assert local_num_cpus(PipelineRayConfig(cpus_per_task=2), tasks=8, workers=3) == 6  # 3 tasks at once
    (tmp_path / "typo.yaml").write_text("ray:\n  adress: x\n")
    with pytest.raises(ConfigError, match=r"unknown ray keys \['adress'\]"):
        options.config_from_args(parser.parse_args(["--executor-config", str(tmp_path / "typo.yaml")]), workers=-1)
    with pytest.raises(ConfigError, match="ray.num_cpus"):
        PipelineRayConfig(num_cpus=1, cpus_per_task=2)


def test_each_task_sizes_the_tokenizers_pool_to_its_own_cpus(tmp_path, monkeypatch):
    """Tasks side by side must not each start one HF-tokenizers thread per core of the machine."""
    from megatron_align.corpus import pipeline
    from megatron_align.corpus.pipeline_steps import ShardStep
    from megatron_align.corpus.prepare import prepare_job

    job = prepare_job(tokenizer_config_from_arg("byte", None), str(tmp_path / "out"))
    local = PipelineConfig(executor="local", tasks=8, workers=4)
    assert pipeline.threads_per_task(local, cpus=64) == 16
    assert pipeline.threads_per_task(PipelineConfig(executor="local", tasks=8), cpus=64) == 8  # all at once
    assert pipeline.threads_per_task(PipelineConfig(executor="local", tasks=128), cpus=64) == 1
    assert pipeline.threads_per_task(PipelineConfig(
        executor="slurm", tasks=8, slurm=PipelineSlurmConfig(partition="cpu", cpus_per_task=6)), cpus=64) == 6
    assert pipeline.threads_per_task(PipelineConfig(
        executor="ray", tasks=8, ray=PipelineRayConfig(cpus_per_task=3)), cpus=64) == 3

    monkeypatch.setenv("RAYON_NUM_THREADS", "unset")  # records the original state, so teardown restores it
    monkeypatch.delenv("RAYON_NUM_THREADS")
    ShardStep(job, [], str(tmp_path), threads=5).run()
    assert os.environ["RAYON_NUM_THREADS"] == "5"
    ShardStep(job, [], str(tmp_path), threads=7).run()
    assert os.environ["RAYON_NUM_THREADS"] == "5"  # set before the pool starts; a user's own value wins
