# Every target installs into .venv first, so `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e ".[test,openvino,tflite,tracking,ray]"
	touch $(STAMP)

demo: install
	$(BIN)/visiontune scan flowers-mini
	$(BIN)/visiontune train flowers-mini --out runs/demo --overwrite

# The report and web-page tests drive Debian's chromium through Playwright. Installed here when missing
# and apt-get is usable (root or sudo); elsewhere those tests skip and say why.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
		elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get install -y -q chromium >/dev/null; \
		else echo "chromium not installed and no root: browser tests will be skipped"; fi; \
	fi

lint: install
	$(BIN)/ruff check src tests bench

# Two test processes share the cores: torch using every core in each oversubscribes them (BENCHMARKS.md,
# "The test suite's threads"), so each gets half; the CLI processes the tests start inherit it.
test: install browser
	OMP_NUM_THREADS=$$(( ($$(nproc) + 1) / 2 )) $(BIN)/python -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) runs build src/*.egg-info
