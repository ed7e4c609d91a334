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
# MUTATION_TESTS='tests/test_ppo.py ...' runs them against those tests only, in a copy of the tracked files under
# build/mutation/ (results persist in build/mutation/mutants/).
MUTANTS ?=
MUTATION_TESTS ?=
JOBS ?= 2
mutation: $(PY)
	$(PY) -m pip install --quiet 'mutmut==3.8.1'
ifeq ($(strip $(MUTATION_TESTS)),)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/mutmut run --max-children $(JOBS) $(MUTANTS) || true
	$(VENV)/bin/mutmut results --all true | awk -F': ' -f mutation_score.awk
else
	sh tools/mutation_workdir.sh build/mutation '$(MUTATION_TESTS)'
	cd build/mutation && TF_CPP_MIN_LOG_LEVEL=2 $(CURDIR)/$(VENV)/bin/mutmut run --max-children $(JOBS) $(MUTANTS) || true
	cd build/mutation && $(CURDIR)/$(VENV)/bin/mutmut results --all true | awk -F': ' -f $(CURDIR)/mutation_score.awk
endif

clean:
	rm -rf $(VENV) build *.egg-info mutants
