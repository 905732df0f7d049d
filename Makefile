# make demo  -- create .venv if missing, install, run the sinusoid example
# make test  -- create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.metagrad-installed
DEMO_OUT ?= results/sinusoid
# Test workers (pytest-xdist): one per core, at most 4; each runs torch on one thread.
TEST_WORKERS ?= auto

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,examples,higher,torchopt]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/sinusoid.py --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
