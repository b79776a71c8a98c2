# The two commands of the README, and what they need. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= work/flamingo-tiny
# The newest tested set (jax 0.12 needs Python >= 3.12) goes into its own virtualenv.
VENV312 ?= .venv312
BIN312 := $(VENV312)/bin
# An interpreter for it: PYTHON312 if given, else the first of these that is really 3.12
# (pyenv's shim `python3.12` is on PATH even where it only prints "command not found").
PYTHON312_CANDIDATES = $(PYTHON312) "$$(pyenv prefix 3.12 2>/dev/null)/bin/python3.12" \
  python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12 \
                        /root/.pyenv/versions/3.12*/bin/python3.12)

.PHONY: demo recipe recipe-llava recipe-blip2 gpu-wheels test test-slow test-py312 install install-py312 clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[tpu,test,parity,eval]'
	$(BIN)/pip install -q --no-deps open-flamingo==2.0.1
	touch $@

install: $(BIN)/.installed

# No parity extra: torch for Python 3.12 is on the index only as the large CUDA build.
$(BIN312)/.installed: pyproject.toml constraints-py312.txt
	test -x $(BIN312)/python || for py in $(PYTHON312_CANDIDATES); do \
	  if "$$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then \
	    "$$py" -m venv $(VENV312) && break; fi; done; \
	test -x $(BIN312)/python || { echo "no Python 3.12 found: set PYTHON312=/path/to/python3.12"; \
	  exit 1; }
	$(BIN312)/pip install -q -c constraints-py312.txt -e '.[tpu,test,eval]'
	touch $@

install-py312: $(BIN312)/.installed

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

# The Flamingo recipe (configs/flamingo/staged.py): lm/tiny, then clip/tiny, then a Flamingo
# over both, frozen, each stage resuming its work directory under RECIPE_ROOT (a finished
# stage is a no-op); then `mmjax eval` of the Flamingo.
RECIPE_ROOT ?= work
recipe: $(BIN)/.installed-demo
	$(BIN)/mmjax recipe flamingo/staged --workdir-root $(RECIPE_ROOT)

# LLaVA's two-stage recipe (configs/llava/tiny_stage2.py): lm/tiny and clip/tiny (shared
# with the Flamingo recipe's), stage 1 (projector), stage 2 (projector and LM), then eval.
recipe-llava: $(BIN)/.installed-demo
	$(BIN)/mmjax recipe llava/tiny_stage2 --workdir-root $(RECIPE_ROOT)

# BLIP-2's two-stage recipe (configs/blip2/tiny_stage2.py): lm/tiny and clip/tiny (shared with
# the other recipes'), stage 1 (the Q-Former: ITC, ITM, ITG), stage 2 (Q-Former and projection
# into the frozen LM), then eval.
recipe-blip2: $(BIN)/.installed-demo
	$(BIN)/mmjax recipe blip2/tiny_stage2 --workdir-root $(RECIPE_ROOT)

# The default test tier (under 20 minutes on 2 CPU cores). The parity extra is installed
# here, so a parity test that cannot import torch is an error, not a skip. Every tier runs on
# two pytest-xdist workers, a test file each at a time (--dist loadfile keeps a file's module
# fixtures in one process): most tests spend their time in one-threaded compiles, so a second
# worker uses the second core; on this project's 2-core VM this leg took 11:08 this way
# against 26:57 serial (docs/history.md).
XDIST = -n 2 --dist loadfile
test: install
	MMJAX_REQUIRE_PARITY=1 $(BIN)/python -m pytest -q $(XDIST) --durations=25

# The default tier on the newest tested set (Python 3.12, constraints-py312.txt); the parity
# tests skip.
test-py312: install-py312
	$(BIN312)/python -m pytest -q $(XDIST) --durations=25

# The slow tier: larger kernel grids, end-to-end runs.
test-slow: install
	MMJAX_REQUIRE_PARITY=1 $(BIN)/python -m pytest -q $(XDIST) -m slow

# Python 3.12 wheels of the dependencies the lent GPU machine's image lacks (it reaches no
# package index), for benchmarks/run_gpu.sh: the device call carries .whl/ (git-ignored).
# promise publishes only a source archive: built into a wheel here.
GPU_WHEELS = ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 \
	portpicker==1.6.0 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0 \
	tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 googleapis-common-protos==1.76.0
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)
	$(BIN)/pip wheel -q --no-deps -w .whl promise==2.3
	ls -l .whl

clean:
	rm -rf $(VENV) $(VENV312) work
