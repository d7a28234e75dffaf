# Every target installs into .venv first, so `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/visiontune scan flowers-mini
	$(BIN)/visiontune train flowers-mini --out runs/demo --overwrite

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) runs build src/*.egg-info
