# Everything a newcomer needs: `make demo`, `make test`. Each target sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= pets37
# Extra `--set key=value` overrides for `make finetune`, e.g. SET="epochs=3 batch_size=8".
SET ?=
OUT ?=
PYTEST_ARGS ?=
# Options for `make gpu-check`, e.g. GPU_CHECK_ARGS="--shared ../shared --out gpu-check.md" or "--cpu-smoke".
GPU_CHECK_ARGS ?=

.PHONY: install test test-slow demo finetune bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The default suite (CI): everything but the benchmarks and the `slow` tests; real-data tests skip
# when ../shared is absent.
test: install
	$(PY) -m pytest -q --durations=8 -m "not slow" $(PYTEST_ARGS) tests

# The long checks kept out of CI's time budget (e.g. the 12-kill resume loop).
test-slow: install
	$(PY) -m pytest -q --durations=8 -m slow $(PYTEST_ARGS) tests

demo: install
	$(VENV)/bin/finetune demo

finetune: install
	$(VENV)/bin/finetune train $(RECIPE) $(foreach s,$(SET),--set $(s)) $(if $(OUT),--out $(OUT))

bench: install
	$(PY) -m benchmarks.run

# On a CUDA machine, in under 8 minutes: the `cuda` tests, the B_16 benchmark and a real fine-tune +
# greedy soup + eval, each in its own time-limited process; ends with one markdown table (also
# written to gpu-check.md). Without CUDA it says so and skips; --cpu-smoke runs the CPU-safe parts tiny.
gpu-check: install
	$(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
