"""Static checks of the cluster files (shellcheck, Dockerfile pins), `slurm render`, and `doctor`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_align.cli import main as cli_main
from megatron_align.errors import ConfigError
from megatron_align.slurm import job_shape, read_exclude_file, render

REPO = Path(__file__).resolve().parents[2]
SHELL_SCRIPTS = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/*.sh"), *REPO.glob("tests/cluster/*.sh")])


@pytest.fixture(scope="module")
def shellcheck() -> str:
    """The shellcheck binary; installed with apt-get when missing (skip only where that is impossible)."""
    path = shutil.which("shellcheck")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run("apt-get update -qq && apt-get install -y -qq shellcheck", shell=True, env=env,
                       capture_output=True, timeout=600)
        path = shutil.which("shellcheck")
    if path is None:
        pytest.skip("shellcheck is not installed and cannot be installed here (needs root + apt-get)")
    return path


def _directives(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        m = re.match(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def _render_cli(capsys, *argv: str) -> str:
    assert cli_main(["slurm", "render", *argv]) == 0
    return capsys.readouterr().out


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- shell scripts -------------------------------------------------------------------------------
def test_there_are_job_scripts():
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"pretrain.sbatch", "midtrain.sbatch", "preflight.sbatch", "convert.sbatch", "common.sh",
            "slurm_harness.sh"} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_clean(shellcheck, script):
    proc = subprocess.run([shellcheck, "-x", "-P", str(REPO), str(script)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendered_script_is_shellcheck_clean(shellcheck, tmp_path, capsys):
    config = _write(tmp_path, "c.yaml", "run_dir: runs/x\nparallel:\n  world_size: 16\n")
    script = _write(
        tmp_path, "job.sbatch", _render_cli(capsys, str(config), "--partition", "batch", "--account", "proj")
    )
    proc = subprocess.run([shellcheck, "-x", "-P", str(REPO), str(script)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_pretrain_script_has_cluster_directives():
    d = _directives((REPO / "slurm" / "pretrain.sbatch").read_text())
    assert d["signal"] == "B:USR1@180"
    assert "requeue" in d and "exclusive" in d
    assert d["ntasks-per-node"] == d["gpus-per-node"]  # one task per GPU


# -- slurm render --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "world, gpus, expected", [(1, 8, (1, 1)), (8, 8, (1, 8)), (64, 8, (8, 8)), (2, 0, (1, 2)), (16, 4, (4, 4))]
)
def test_job_shape(world, gpus, expected):
    assert job_shape(world, gpus) == expected


def test_job_shape_rejects_partial_nodes():
    with pytest.raises(ConfigError, match="parallel.world_size=12 does not fill whole nodes of 8"):
        job_shape(12, 8)


def test_render_directives_from_config(tmp_path, capsys):
    config = _write(
        tmp_path,
        "big.yaml",
        "run_dir: runs/llama_8b\nparallel:\n  world_size: 32\n  tensor: 2\n"
        "slurm:\n  time: 2-00:00:00\n  partition: h100\n  account: align\n  container_image: /img/ma.sqsh\n",
    )
    script = _render_cli(capsys, str(config), "--exclude-file", str(tmp_path / "none.txt"))
    d = _directives(script)
    assert d["nodes"] == "4" and d["ntasks-per-node"] == "8" and d["gpus-per-node"] == "8"
    assert d["time"] == "2-00:00:00" and d["partition"] == "h100" and d["account"] == "align"
    assert d["job-name"] == "ma-llama_8b" and d["signal"] == "B:USR1@180" and "requeue" in d
    assert "exclude" not in d
    assert f': "${{MA_CONFIG:={config.resolve()}}}"' in script
    assert ': "${MA_CONTAINER_IMAGE:=/img/ma.sqsh}"' in script
    assert f': "${{MA_REPO:={REPO}}}"' in script
    # the body is the template's, unchanged
    body = (REPO / "slurm" / "pretrain.sbatch").read_text().split("set -euo pipefail", 1)[1]
    assert (
        "ma_run_forwarding_signals srun" in body
        and body.count("\n") - script.split("set -euo pipefail", 1)[1].count("\n") == 0
    )


def test_render_flags_override_config_and_cpu_nodes_drop_gpus(tmp_path, capsys):
    config = _write(tmp_path, "c.yaml", "parallel:\n  world_size: 2\nslurm:\n  partition: h100\n")
    d = _directives(
        _render_cli(
            capsys,
            str(config),
            "--gpus-per-node",
            "0",
            "--partition",
            "debug",
            "--time",
            "00:10:00",
            "--exclude-file",
            str(tmp_path / "none.txt"),
        )
    )
    assert d["nodes"] == "1" and d["ntasks-per-node"] == "2" and "gpus-per-node" not in d
    assert d["partition"] == "debug" and d["time"] == "00:10:00" and "account" not in d


def test_render_adds_preflight_exclusions(tmp_path, capsys):
    exclude = _write(tmp_path, "exclude_nodes.txt", "# megatron-align preflight exclude list v1\n# status=ok\n"
                     "gpu-017  # node all_reduce busbw 210.0 < 300 GB/s\ngpu-042\n")
    assert read_exclude_file(exclude) == ["gpu-017", "gpu-042"]
    config = _write(tmp_path, "c.yaml", "parallel:\n  world_size: 8\n")
    d = _directives(_render_cli(capsys, str(config), "--exclude-file", str(exclude)))
    assert d["exclude"] == "gpu-017,gpu-042"


def test_render_errors_name_the_key(tmp_path, capsys):
    bad = _write(tmp_path, "bad.yaml", "parallel:\n  world_size: 8\nslurm:\n  partitoin: h100\n")
    assert cli_main(["slurm", "render", str(bad)]) == 2
    assert "slurm.partitoin" in capsys.readouterr().err
    bad = _write(tmp_path, "bad_time.yaml", "slurm:\n  time: two days\n")
    assert cli_main(["slurm", "render", str(bad)]) == 2
    assert "slurm.time" in capsys.readouterr().err


def test_render_function_replaces_inserts_and_removes():
    template = (
        "#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --gpus-per-node=8\n#SBATCH --requeue\n"
        "set -e\n: \"${MA_VERB:=launch}\"  # verb\n"
    )
    out = render(template, {"nodes": "3", "gpus-per-node": None, "partition": "p"}, {"MA_VERB": "train"}, "# hdr")
    assert out.splitlines() == [
        "#!/bin/bash",
        "# hdr",
        "#SBATCH --nodes=3",
        "#SBATCH --requeue",
        "#SBATCH --partition=p",
        "set -e",
        ': "${MA_VERB:=train}"  # verb',
    ]


def test_render_to_file_is_executable(tmp_path):
    config = _write(tmp_path, "c.yaml", "parallel:\n  world_size: 8\n")
    out = tmp_path / "job.sbatch"
    assert cli_main(["slurm", "render", str(config), "-o", str(out)]) == 0
    assert os.access(out, os.X_OK) and _directives(out.read_text())["nodes"] == "1"


# -- Dockerfile ----------------------------------------------------------------------------------
def test_dockerfile_pins_everything():
    text = (REPO / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    base = args["BASE_IMAGE"].strip('"')
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M)
    assert "latest" not in text.lower()
    assert re.fullmatch(r"v\d+\.\d+\.\d+", args["NCCL_TESTS_VERSION"])
    for name in ("DALI_VERSION", "MLFLOW_VERSION", "NVIDIA_ML_PY_VERSION"):
        assert re.fullmatch(r"\d+(\.\d+)+", args[name]), name
    for pkg, arg in (("nvidia-dali-cuda130", "DALI_VERSION"), ("mlflow", "MLFLOW_VERSION"),
                     ("nvidia-ml-py", "NVIDIA_ML_PY_VERSION")):
        assert f'"{pkg}==${{{arg}}}"' in text
    # The stack pins come from stacks.env (one place for CI and the image; tests/test_stacks.py checks the values).
    assert "COPY stacks.env /opt/stacks.env" in text and ". /opt/stacks.env" in text
    for pkg, key in (
        ("megatron-core", "CURRENT_MEGATRON_CORE"),
        ("nvidia-resiliency-ext", "GPU_NVIDIA_RESILIENCY_EXT"),
    ):
        assert f'"{pkg}==${{{key}}}"' in text
    assert "--branch \"${NCCL_TESTS_VERSION}\"" in text and "/opt/nccl-tests" in text
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1] != "root"
    assert (REPO / ".dockerignore").is_file() and "data" in (REPO / ".dockerignore").read_text().split()


def test_docker_readme_has_run_flags():
    text = (REPO / "docker" / "README.md").read_text()
    for needed in ("--gpus all", "--ipc=host", "--ulimit memlock=-1", "--ulimit stack=67108864", "enroot import",
                   "--container-image"):
        assert needed in text


# -- doctor --------------------------------------------------------------------------------------
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_doctor_on_this_machine_exits_zero():
    if _cuda():
        pytest.skip("CPU-machine expectation; a GPU node may report health problems")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_align.cli", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "megatron-core" in proc.stdout and "fp8=no" in proc.stdout


def test_doctor_json_and_config_needs(tmp_path, capsys):
    ok = _write(tmp_path, "ok.yaml", "precision: auto\nmodel:\n  spec: local\nparallel:\n  world_size: 2\n")
    assert cli_main(["doctor", str(ok), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["unmet"] == []
    assert report["python"] == sys.version.split()[0]
    assert set(report["features"]) >= {"fp8", "te_spec", "dali_loader", "mlflow_tracking", "nvml_health"}


def test_doctor_fp8_config_fails_without_fp8_gpu(tmp_path, capsys):
    if _cuda():
        pytest.skip("needs a machine without FP8-capable GPUs + TE")
    cfg = _write(tmp_path, "fp8.yaml", "precision: fp8\nmodel:\n  spec: te\nparallel:\n  world_size: 6\n  tensor: 4\n")
    assert cli_main(["doctor", str(cfg)]) == 1
    captured = capsys.readouterr()
    assert "3 unmet need(s)" in captured.out
    assert "precision=fp8 needs Transformer Engine and FP8 GPUs" in captured.out
    assert "model.spec=te needs Transformer Engine" in captured.out
    assert "divisible by tensor*pipeline*context=4" in captured.out
    assert "not ready" in captured.err


def test_doctor_missing_config_is_a_user_error(tmp_path, capsys):
    assert cli_main(["doctor", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_render_nsys_profile_wraps_each_rank(shellcheck, tmp_path, capsys):
    config = _write(tmp_path, "n.yaml", "run_dir: runs/prof\nparallel:\n  world_size: 8\nprofile:\n  mode: nsys\n")
    script = _write(tmp_path, "job.sbatch", _render_cli(capsys, str(config)))
    text = script.read_text()
    assert ': "${MA_VERB:=train}"' in text and ': "${MA_NSYS:=runs/prof/profile}"' in text
    assert "--capture-range=cudaProfilerApi" in text and '"${rank_wrapper[@]}" "$MA_CMD"' in text
    proc = subprocess.run([shellcheck, "-x", "-P", str(REPO), str(script)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert cli_main(["slurm", "render", str(config), "--verb", "launch"]) == 2
    assert "profile.mode=nsys wraps each rank in `nsys profile`, which needs --verb train" in capsys.readouterr().err
