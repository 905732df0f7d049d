# make demo  -- create .venv if missing, install, run the sinusoid example
# make test  -- create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.metagrad-installed
DEMO_OUT ?= results/sinusoid

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
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
