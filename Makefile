# Two entry points (README Quickstart): `make tiny` trains the tiny CPU example, `make test` runs the suite.
# Both create ./.venv and install everything they need on a fresh machine (Python 3.11, no GPU).
# The second tested stack (Python 3.12 + the newest megatron-core): `make test-current` (./.venv312).
# Every stack version comes from stacks.env, the one place the Dockerfile and CI read as well.
include stacks.env

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==$(BASE_TORCH)
MCORE_SPEC ?= megatron-core==$(BASE_MEGATRON_CORE)
BIN := $(VENV)/bin

CURRENT_VENV ?= .venv312
# What the current stack leaves to the base stack (README "Two stacks"): the SLURM cluster tests and the
# tests marked `single_stack` (slowest end-to-end runs whose code path does not depend on the version).
CURRENT_PYTEST_ARGS ?= --ignore=tests/cluster -m "not single_stack"
# The GPU check's wheels (benchmarks/gpu_check.sh): downloaded here, carried to a GPU machine without network.
WHEELS ?= wheels
OUT ?= runs/gpu_rehearse

$(BIN)/.installed: pyproject.toml stacks.env
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" "$(MCORE_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(MCORE_SPEC)"
	touch $@

.PHONY: install tiny test install-current test-current test-cross-stack gpu-wheels gpu-rehearse
install: $(BIN)/.installed

tiny: $(BIN)/.installed
	$(BIN)/python tools/make_tiny_corpus.py data/tiny
	$(BIN)/megatron-align train examples/tiny_cpu.yaml $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 $(PYTEST_ARGS)

# The same recipes on the current stack; the interpreter is found by tools/find_python.sh, which fails
# loudly (never skips) when Python $(CURRENT_PYTHON) is missing.
install-current test-current:
	@py="$$(tools/find_python.sh $(CURRENT_PYTHON))" || exit 1; \
	$(MAKE) --no-print-directory $(subst -current,,$@) PYTHON="$$py" VENV=$(CURRENT_VENV) \
		TORCH_SPEC=torch==$(CURRENT_TORCH) MCORE_SPEC=megatron-core==$(CURRENT_MEGATRON_CORE) \
		PYTEST_ARGS='$(CURRENT_PYTEST_ARGS) $(PYTEST_ARGS)'

# A checkpoint of each stack resumed on the other (tests/test_cross_stack.py); both venvs are built first.
test-cross-stack: $(BIN)/.installed install-current
	MA_OTHER_STACK_PYTHON=$(CURRENT_VENV)/bin/python MA_REQUIRE_CROSS_STACK=1 \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_cross_stack.py $(PYTEST_ARGS)

# Wheels for benchmarks/gpu_check.sh (cp312, Linux x86_64): what the GPU machine's image lacks -- megatron-core,
# nvidia-resiliency-ext and benchmarks/gpu_wheels.txt -- as binary wheels. Not this package: the check imports the
# working tree. The folder must stay under 64 MiB (what can be carried to the GPU machine, with `carry: wheels/`).
gpu-wheels:
	@py="$$(tools/find_python.sh $(CURRENT_PYTHON))" || exit 1; \
	rm -rf $(WHEELS) && mkdir -p $(WHEELS) && \
	"$$py" -m pip download -q --no-deps --only-binary=:all: --python-version $(CURRENT_PYTHON) \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_39_x86_64 --implementation cp -d $(WHEELS) \
		megatron-core==$(CURRENT_MEGATRON_CORE) nvidia-resiliency-ext==$(GPU_NVIDIA_RESILIENCY_EXT) \
		-r benchmarks/gpu_wheels.txt && \
	du -sh $(WHEELS) && ls $(WHEELS)

# The one-call GPU check rehearsed on CPU (docs/benchmarks.md): fresh Python 3.12 venv like the device image,
# the carried wheels, the same stages, budgets and output layout on a tiny model.
gpu-rehearse:
	benchmarks/gpu_check.sh --rehearse $(OUT)
