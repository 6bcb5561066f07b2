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

.PHONY: env course test bench strip clean help browser rehearsal lab

help:
	@echo "make course   run every notebook headless on the tiny profile into runs/$(NAME)/"
	@echo "make test     run the whole test suite"
	@echo "make lab      open the course in JupyterLab (on this machine, http://localhost:8888)"
	@echo "make bench    run the benchmarks in bench/"
	@echo "make rehearsal  notebooks 00-04 on the kolors profile on this CPU, Kolors-sized random weights (~18 GB in cache/rehearsal)"
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

# The course in JupyterLab on your own machine: the notebooks folder, widgets working.
# Outputs go to runs/ as in `make course`; the notebooks stay as you leave them.
LAB_PORT ?= 8888
lab: env
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install --quiet -e ".[lab]"
	$(VENV)/bin/jupyter-lab --notebook-dir=notebooks --port=$(LAB_PORT)

bench: env
	$(PY) bench/run.py

# The gallery test opens the HTML gallery in a real headless browser and checks
# that its Chinese title renders as characters, not boxes: it needs chromium and
# a CJK font (Debian's fonts-noto-cjk).  Without chromium it is skipped with a
# reason; with chromium but no CJK font it fails.  CI runs this before `make test`.
BROWSER_FONT ?= fonts-noto-cjk
browser:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="chromium"; \
	  fc-list :lang=zh family 2>/dev/null | grep -q . || missing="$$missing $(BROWSER_FONT)"; \
	  if [ -z "$$missing" ]; then \
	    echo "chromium: $$(command -v chromium); CJK font: $$(fc-list :lang=zh family | head -n 1)"; \
	  elif [ "$$(id -u)" = 0 ] && apt-get update -qq \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; then \
	    echo "installed:$$missing"; \
	  else \
	    echo "not installed (needs root and apt):$$missing; without chromium the gallery browser test is skipped"; \
	  fi

# The kolors profile's dress rehearsal (not part of `make test`): random weights of the real
# Kolors sizes in the real download's layout (written once into cache/rehearsal, about 18 GB),
# then every notebook on the kolors profile with a CPU's numbers (bfloat16, 128 px, 2 steps).
# Needs about 20 GB of memory and 19 GB of disk; figures in README, "Measured figures".
rehearsal: env
	mkdir -p runs/rehearsal
	/usr/bin/time -v -o runs/rehearsal/time.txt $(VENV)/bin/kolors-course rehearsal --out runs/rehearsal; \
	  rc=$$?; grep -E "Elapsed|Maximum resident" runs/rehearsal/time.txt; exit $$rc

strip: env
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean:
	rm -rf runs cache .pytest_cache
