"""The two tested stacks (stacks.env): one set of pins that the Dockerfile, pyproject and the Makefile agree
on, a Python finder that fails loudly, and the version-dependent choices (async writer, GPTModel warning)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys

from conftest import REPO

mcore = importlib.metadata.version("megatron-core")
on_019 = tuple(int(x) for x in mcore.split(".")[:2]) >= (0, 19)


def _pins() -> dict[str, str]:
    with open(os.path.join(REPO, "stacks.env")) as f:
        return dict(line.strip().split("=", 1) for line in f if line.strip() and not line.startswith("#"))


def test_one_set_of_pins_that_dockerfile_and_pyproject_follow():
    from packaging.specifiers import SpecifierSet

    pins = _pins()
    assert {"BASE_PYTHON", "BASE_TORCH", "BASE_MEGATRON_CORE", "CURRENT_PYTHON", "CURRENT_TORCH",
            "CURRENT_MEGATRON_CORE", "NGC_PYTORCH_IMAGE", "GPU_NVIDIA_RESILIENCY_EXT"} <= set(pins)
    with open(os.path.join(REPO, "docker", "Dockerfile")) as f:
        docker = f.read()
    assert re.search(r"^ARG BASE_IMAGE=(\S+)$", docker, re.M).group(1) == pins["NGC_PYTORCH_IMAGE"]
    assert "COPY stacks.env" in docker and ". /opt/stacks.env" in docker
    assert '"megatron-core==${CURRENT_MEGATRON_CORE}"' in docker
    assert not re.search(r"megatron-core==\d", docker), (
        "the Dockerfile must take megatron-core's version from stacks.env"
    )
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        pyproject = f.read()
    spec = SpecifierSet(re.search(r'"megatron-core([^"]+)"', pyproject).group(1))
    python = SpecifierSet(re.search(r'requires-python = "([^"]+)"', pyproject).group(1))
    for stack in ("BASE", "CURRENT"):
        assert pins[f"{stack}_MEGATRON_CORE"] in spec, (stack, spec)
        assert pins[f"{stack}_PYTHON"] + ".0" in python, (stack, python)
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    assert "include stacks.env" in makefile and "megatron-core==$(CURRENT_MEGATRON_CORE)" in makefile


def test_find_python_finds_this_interpreter_and_fails_loudly_for_a_missing_one():
    want = "{}.{}".format(*sys.version_info[:2])
    env = dict(os.environ, **{f"PYTHON_{want.replace('.', '')}": sys.executable})
    found = subprocess.run(
        ["tools/find_python.sh", want], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert found.returncode == 0, found.stderr
    version = subprocess.run([found.stdout.strip(), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60).stdout
    assert version.strip() == str(sys.version_info[:2])
    missing = subprocess.run(["tools/find_python.sh", "3.99"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and not missing.stdout
    assert "no working Python 3.99" in missing.stderr and "PYTHON_399" in missing.stderr


def test_async_writer_choice_on_this_stack_and_in_doctor():
    from megatron_align.training import async_save

    choice = async_save.choose()
    assert choice.name == "mcore"  # nvidia-resiliency-ext is not installed on the CPU test machines
    assert choice.selectable is on_019
    assert async_save.save_kwargs(choice) == ({"async_strategy": "mcore"} if on_019 else {})
    if on_019:
        assert "nvidia-resiliency-ext not installed" in choice.reason
    else:
        assert f"megatron-core {mcore} has only its own async save" == choice.reason
    out = subprocess.run([sys.executable, "-m", "megatron_align.cli", "doctor", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert json.loads(out.stdout)["async_save"] == f"mcore ({choice.reason})"


def test_an_nvrx_that_cannot_import_falls_back_to_megatron_cores_writer(tmp_path):
    """nvidia-resiliency-ext 0.7 wheels need glibc 2.39; on an older system the import fails (stand-in package)."""
    pkg = tmp_path / "nvidia_resiliency_ext" / "checkpointing" / "async_ckpt"
    pkg.mkdir(parents=True)
    for d in (pkg.parent.parent, pkg.parent, pkg):
        (d / "__init__.py").write_text("")
    (pkg / "core.py").write_text(
        "raise ImportError(\"/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.39' not found\")\n"
    )
    code = "from megatron_align.training import async_save as a; s = a.choose(); print(s.name + '|' + s.reason)"
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, reason = out.stdout.strip().splitlines()[-1].split("|", 1)
    assert name == "mcore"
    assert ("GLIBC_2.39" in reason and "unusable" in reason) if on_019 else "has only its own" in reason


def test_only_the_deprecation_records_we_acted_on_are_dropped(caplog):
    import inspect

    from megatron.core.dist_checkpointing.strategies import common
    from megatron.core.models.gpt import gpt_model

    from megatron_align.model.builder import GPT_DEPRECATION
    from megatron_align.training.checkpoint import LOAD_COMMON_DEPRECATION

    for module, prefix in ((gpt_model, GPT_DEPRECATION), (common, LOAD_COMMON_DEPRECATION)):
        if on_019:  # the filter must keep matching the text this version really logs
            assert prefix in inspect.getsource(module)
        logger = logging.getLogger(module.__name__)  # the logger the module warns on
        caplog.clear()
        with caplog.at_level(logging.INFO):
            logger.warning(prefix + ". and the rest of Megatron's message")
            logger.warning("another Megatron warning")
        messages = [r.getMessage() for r in caplog.records]
        assert "another Megatron warning" in messages
        assert not any(m.startswith(prefix) for m in messages), messages
