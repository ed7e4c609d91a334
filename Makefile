# Everything installs into .venv/ at the repository root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test demo bench clean

$(PY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(PY)

install: $(PY)

test: $(PY)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q tests

demo: $(PY)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) launch.py demo

bench: $(PY)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) bench.py

clean:
	rm -rf $(VENV) build *.egg-info
