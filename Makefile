# Two entry points: `make demo` and `make test`. Each creates .venv (Python 3.11) on first use.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt "torch==2.13.0"
	$(PIP) install --quiet -c constraints.txt -e ".[all,test,docs]"
	touch $@

demo: setup
	$(VENV)/bin/metalab demo

test: setup
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
