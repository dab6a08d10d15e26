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

.PHONY: install demo test test-fast lint format bench-speed clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/stbench list datasets
	$(VENV)/bin/stbench data prepare synthetic --data-root $(DEMO_ROOT)
	$(VENV)/bin/stbench data info synthetic --data-root $(DEMO_ROOT)
	$(VENV)/bin/stbench splits synthetic --protocol loso --data-root $(DEMO_ROOT)
	@if [ -d $(SHARED)/her2st ]; then \
	  $(VENV)/bin/stbench data prepare her2st --source $(SHARED)/her2st --data-root $(DEMO_ROOT) && \
	  $(VENV)/bin/stbench data info her2st --data-root $(DEMO_ROOT) && \
	  $(VENV)/bin/stbench splits her2st --protocol loso --data-root $(DEMO_ROOT); \
	fi

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -m "not slow and not real_data"

lint: install
	$(VENV)/bin/ruff check stbench baselines tests benchmarks
	$(VENV)/bin/ruff format --check stbench baselines tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix stbench baselines tests benchmarks
	$(VENV)/bin/ruff format stbench baselines tests benchmarks

bench-speed: install
	$(PY) benchmarks/speed/patch_extraction.py

clean:
	rm -rf $(DEMO_ROOT) .pytest_cache
