# stbench: `make demo` (set up + run the main job on the embedded synthetic dataset),
# `make test` (set up + pass the tests). Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stbench-installed
# This machine keeps these wheels on disk; elsewhere pick the build for your CUDA/CPU.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_ROOT ?= .stbench-demo
SHARED ?= ../shared/data
CI_ROOT ?= .stbench-ci
# OpenMP threads sleep instead of spinning while they wait: on a small shared CPU machine spinning
# threads starve each other (5-10x slower training); numerics are unchanged.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-fast lint format ci-bench leaderboard bench-speed clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded default: a small benchmark (mean vs patch-cnn) on the offline
# synthetic dataset, printing its table; the synthetic data is generated on first use.
demo: install
	$(VENV)/bin/stbench data prepare synthetic --data-root $(DEMO_ROOT)
	$(VENV)/bin/stbench data info synthetic --data-root $(DEMO_ROOT)
	$(VENV)/bin/stbench splits synthetic --protocol loso --data-root $(DEMO_ROOT)
	$(VENV)/bin/stbench benchmark benchmarks/suites/demo.yaml --data-root $(DEMO_ROOT) --output $(DEMO_ROOT)/outputs/demo
	$(VENV)/bin/stbench leaderboard --results $(DEMO_ROOT)/outputs/demo/results.jsonl --out $(DEMO_ROOT)/leaderboard \
	  --predictions [$(DEMO_ROOT)/outputs/demo]
	@echo "demo leaderboard: $(DEMO_ROOT)/leaderboard/LEADERBOARD.md and leaderboard.html"

# Two workers (one per core of the CI machine); whole files go to one worker, so a file's
# module-scoped fixtures (trained checkpoints, prepared data) are built once. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test-fast: install
	$(PY) -m pytest -q -m "not slow and not real_data"

# The CI benchmark: every method's tiny config on the real Her2ST image slides (synthetic when
# ../shared is absent), compared with the committed rows within the suite's tolerance; then the
# committed leaderboard must equal a regeneration from the committed rows.
ci-bench: install
	$(VENV)/bin/stbench benchmark benchmarks/suites/ci.yaml --data-root $(CI_ROOT)/data --output $(CI_ROOT)/outputs/ci \
	  --compare benchmarks/results/ci/results.jsonl
	$(VENV)/bin/stbench leaderboard --check true

leaderboard: install
	$(VENV)/bin/stbench leaderboard

lint: install
	$(VENV)/bin/ruff check stbench baselines tests benchmarks
	$(VENV)/bin/ruff format --check stbench baselines tests benchmarks
	$(VENV)/bin/lint-imports  # import contracts in pyproject.toml [tool.importlinter]

format: install
	$(VENV)/bin/ruff check --fix stbench baselines tests benchmarks
	$(VENV)/bin/ruff format stbench baselines tests benchmarks

bench-speed: install
	$(PY) benchmarks/speed/patch_extraction.py
	$(PY) benchmarks/speed/metrics.py
	$(PY) benchmarks/speed/runner_overhead.py

clean:
	rm -rf $(DEMO_ROOT) $(CI_ROOT) .pytest_cache
