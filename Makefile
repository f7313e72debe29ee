# The README's commands. Each creates the virtual environment on first use (`make venv`).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# setup.cfg accepts a range of PyTorch releases; the tests run on the pinned one
	$(PIP) install -q -c constraints.txt -e '.[msn,dev]'
	# sunds is only used by the tests, to read our MSN-format output as the reference does; its
	# declared dependencies are heavier than what it needs with TensorFlow already installed.
	$(PIP) install -q --no-deps 'sunds==0.4.1'
	touch $@

demo: $(VENV)/.installed
	$(PY) tools/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q
