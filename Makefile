# Everything installs into .venv/ at the repository root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test demo bench horovod mutation clean

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

# horovod 0.28.1 built from source into .venv against the installed TensorFlow (a few minutes; needs cmake and g++;
# why a build of our own: tools/build_horovod.sh). GPU boxes: HOROVOD_GPU_OPERATIONS=NCCL make horovod.
horovod: $(PY)
	bash tools/build_horovod.sh

# Mutation testing (a tool, not part of `make test`): mutmut plants small bugs in the modules listed under
# [tool.mutmut] in pyproject.toml, one at a time, and runs the tests that reach the mutated function.
# MUTANTS narrows the run (e.g. MUTANTS='lm_human_preferences.ppo*'); results persist in mutants/.
MUTANTS ?=
JOBS ?= 2
mutation: $(PY)
	$(PY) -m pip install --quiet 'mutmut==3.8.1'
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/mutmut run --max-children $(JOBS) $(MUTANTS) || true
	$(VENV)/bin/mutmut results --all true | awk -F': ' -f mutation_score.awk

clean:
	rm -rf $(VENV) build *.egg-info mutants
