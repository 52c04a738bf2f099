# `make book` runs every chapter at PRESET and builds the HTML; `make test` runs every test
# (what CI runs); `make test-fast` leaves out the slow end-to-end ones.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny
CHAPTERS ?=

.PHONY: book test test-fast chapters bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

book: $(VENV)/.installed
	$(PY) -m mlclt_utils.runner --preset $(PRESET) $(if $(CHAPTERS),--chapters $(CHAPTERS),)

chapters: $(VENV)/.installed
	$(PY) -m mlclt_utils.runner --preset $(PRESET) --no-build $(if $(CHAPTERS),--chapters $(CHAPTERS),)

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) -m mlclt_utils.bench train
	$(PY) -m mlclt_utils.bench clt

clean:
	rm -rf _build book/chapters
