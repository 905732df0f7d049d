# make demo  -- create .venv if missing, install, run the sinusoid example
# make test  -- create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.metagrad-installed
DEMO_OUT ?= results/sinusoid
# Test workers (pytest-xdist): one per core, at most 4, each running torch on one thread; a worker
# that runs out of tests takes some of another's (worksteal), so the long compiled tests do not
# leave one core idle at the end.
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
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
