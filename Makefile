# The two set-up commands of README.md. Both create (or reuse) .venv and install torch==2.13.0 before anything
# else, so pip never pulls a multi-GB CUDA build of torch as someone's dependency.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run run-s3 test bench-overhead clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/vidgen demo

# The same demo with every blob in an S3 bucket: moto's S3 server (a test extra) on loopback stands in for an object
# store (bench/s3server.py).
run-s3: $(STAMP)
	$(BIN)/python -m bench.s3server $(BIN)/vidgen demo

# The web page test drives Debian's chromium with Playwright (never a downloaded browser); where chromium cannot be
# installed (no apt, not root) that one test skips and says why.
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the web page test will skip"
	$(BIN)/python -m pytest

bench-overhead: $(STAMP)
	$(BIN)/vidgen bench overhead

clean:
	rm -rf var out
