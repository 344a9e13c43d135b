# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use and install torch's CPU wheel, then the package.
# The install is stamped, so a second run installs nothing new.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moslora-installed

.PHONY: setup test demo bench-step clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m moslora.cli demo

bench-step: $(STAMP)
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
