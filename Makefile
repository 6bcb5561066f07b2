# Two commands do everything: `make course` and `make test`.
# The environment lives in .venv/ and is created (once) by whichever runs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A known-good torch pair for a fresh CPU machine (see README, "Dependencies").
# On a GPU machine with torch already installed, use notebooks/00_setup instead.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
NAME   ?= course
PROFILE ?= tiny

.PHONY: env course test bench strip clean help browser

help:
	@echo "make course   run every notebook headless on the tiny profile into runs/$(NAME)/"
	@echo "make test     run the whole test suite"
	@echo "make bench    run the benchmarks in bench/"
	@echo "make strip    strip outputs from the notebooks"
	@echo "make browser  install Debian's chromium for the gallery test (root, apt)"

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip check
	touch $@

course: env
	$(VENV)/bin/kolors-course run --profile $(PROFILE) --out runs/$(NAME)

test: env
	$(PY) -m pytest -q

bench: env
	$(PY) bench/run.py

# The gallery test opens the HTML gallery in a real headless browser; without
# chromium it is skipped with a reason.  CI runs this before `make test`.
browser:
	@command -v chromium >/dev/null 2>&1 && echo "chromium: $$(command -v chromium)" || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    && echo "chromium installed"; } || echo "chromium not installed (needs root and apt): the gallery browser test will be skipped"

strip: env
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean:
	rm -rf runs cache .pytest_cache
