# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev,mqtt]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(VENV)/bin/mnet demo --out demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run_all.py

lint: install
	$(VENV)/bin/ruff check mnet search calibration export runtime tests bench

clean:
	rm -rf demo .pytest_cache
