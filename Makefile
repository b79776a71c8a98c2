# The two commands of the README, and what they need. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= work/flamingo-tiny

.PHONY: demo test test-slow install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[tpu,test,parity]'
	$(BIN)/pip install -q --no-deps open-flamingo==2.0.1
	touch $@

install: $(BIN)/.installed

# What the demo needs and no more (no torch, no libtpu): a fresh clone's first command
# should spend its minutes training, not downloading.
$(BIN)/.installed-demo: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

# Build the embedded dataset, train flamingo/tiny on it (with and without images), print
# what it learned.
demo: $(BIN)/.installed-demo
	$(BIN)/mmjax demo --workdir $(WORKDIR)

# The default test tier (under 20 minutes on 2 CPU cores).
test: install
	$(BIN)/python -m pytest -q

# The slow tier: larger kernel grids, end-to-end runs.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) work
