# Two commands do all the set-up on a fresh machine:
#   make test   - virtualenv, pinned torch, torch-scatter, the package + dev extras, the test suite
#   make demo   - the same set-up, then the library's main job on synthetic data
# Every install step lives here (CI runs `make test` on a clean clone).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
TORCH_SCATTER_VERSION := 2.1.2
PYTEST_ARGS ?=

# The support matrix's cells (docs/install.md): torch release[+OpenMMLab stack], each in its own cached virtualenv.
COMPAT_CELLS ?= 2.0.1+mm1 2.1.2+mm2 2.15.0
# torch-scatter is built (5-7 min each) for the oldest and the newest torch; the 2.1 cell is there for mmcv 2.x
COMPAT_SCATTER ?= 2.0.1 2.15.0

.PHONY: all test test-compat demo bench install clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet setuptools wheel

# torch is pinned by exact version: an unpinned torch would pull several GB of CUDA packages.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	touch $@

# torch-scatter has no wheel for this torch: build it against the installed torch (pip caches the wheel).
$(VENV)/.scatter: $(VENV)/.torch
	$(BIN)/python -m pip install --no-build-isolation "torch-scatter==$(TORCH_SCATTER_VERSION)"
	touch $@

# The package, and its fused CPU kernels (sparse_bias._C) compiled against the installed torch, as torch-scatter
# is (no build isolation, so torch is importable; about 40 s on 2 cores). A failed compile leaves the pure-PyTorch
# backends in charge (setup.py warns).
$(VENV)/.package: $(VENV)/.scatter setup.cfg setup.py pyproject.toml $(wildcard sparse_bias/csrc/*)
	@echo "Installing sparse_bias and compiling its fused C++ CPU kernels (sparse_bias._C) against the installed torch: about 40 s on 2 cores ..."
	$(BIN)/python -m pip install --no-build-isolation -e ".[dev,triton]"
	touch $@

install: $(VENV)/.package

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The compatibility tier: the oldest and the newest torch (and the OpenMMLab stacks) on a subset of the suite
# (.ci/compat/SUBSET); every cell runs, then the matrix is printed, and the target fails if any cell failed.
test-compat:
	@root=$${COMPAT_ROOT:-$${XDG_CACHE_HOME:-$$HOME/.cache}/sparse_bias/compat}; rc=0; \
	for cell in $(COMPAT_CELLS); do COMPAT_SCATTER="$(COMPAT_SCATTER)" bash .ci/compat.sh $$cell || rc=1; done; \
	echo "support matrix:"; for cell in $(COMPAT_CELLS); do grep -h "RESULT" $$root/torch-$$cell/log || echo "$$cell: no result"; done; \
	exit $$rc

demo: install
	$(BIN)/python -m sparse_bias.tools.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache build *.egg-info sparse_bias/_C*.so
