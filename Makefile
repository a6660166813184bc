# Two commands do all set-up on a fresh machine:
#   make test    create .venv, install, build the native extension, run the tests
#   make bench   the same set-up, then the benchmark harness (vlfast bench)
# Also: make test-fast (no slow or distributed tests), make lint (ruff), make info, make gate /
# make gate-triton36 (the sm_90a compile gate under the pinned triton / triton 3.6.0),
# make gpu-check (on a GPU machine, with its own python3: no venv, no network; see below).
#
# TORCH_SPEC pins torch and torchvision.  timm and open_clip import torchvision, and the
# integration tests run against the real libraries: on a machine without a GPU the local
# package mirror holds torch 2.14.1 + torchvision 0.29.1 (a CUDA build that runs on the CPU,
# installed from disk, no download). PyPI's torchvision does not import beside the CPU-only
# torch 2.13 wheel. On a GPU machine `make TORCH_SPEC="torch torchvision" test` takes the
# registry's builds.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP_FLAGS  ?= -q --disable-pip-version-check
VPY        := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP:= $(VENV)/.vlfast-built
# what `pip install -e .` reads: a change re-installs (rebuilds vlfast._C, rewrites the metadata and
# its version, which vlfast/__init__.py holds)
INSTALL_SRC:= setup.py pyproject.toml CMakeLists.txt vlfast/__init__.py $(wildcard csrc/*)
BENCH_ARGS ?=
GPU_CHECK_ARGS ?=
PYTEST_ARGS?=

.PHONY: test test-fast lint bench install info clean gpu-check digits gate gate-triton36

$(DEPS_STAMP): Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_FLAGS) $(TORCH_SPEC)
	# unpinned deps that torch does not constrain; torch itself is never re-resolved.
	# pyproject.toml declares each of them (dependencies or an extra); tests/test_packaging.py checks it
	$(VPY) -m pip install $(PIP_FLAGS) triton numpy tqdm matplotlib pillow safetensors pytest pytest-benchmark pybind11 ninja \
		"setuptools>=64" wheel ruff==0.17.6
	# DeepSpeed (ZeRO integration): no build isolation and no deps, so its build uses this torch and never
	# resolves another one; DS_BUILD_OPS=0 builds no ops ahead (the CPU comm op is JIT-built by ninja).
	# These pins are pyproject.toml's `deepspeed` extra, exactly (tests/test_packaging.py checks it)
	DS_BUILD_OPS=0 $(VPY) -m pip install $(PIP_FLAGS) --no-build-isolation --no-deps deepspeed==0.19.8 hjson==3.1.0 \
		msgpack==1.2.4 einops==0.8.2 py-cpuinfo==9.0.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
		typing-inspection==0.4.5 psutil==7.2.2
	# the libraries vlfast.patch drops into, at the versions the integration tests ran against
	# (pyproject.toml's `integrations` extra, exactly); torch is already installed and satisfies them
	$(VPY) -m pip install $(PIP_FLAGS) timm==1.0.31 open_clip_torch==3.3.0 transformers==5.24.0
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(INSTALL_SRC)
	$(VPY) -m pip install $(PIP_FLAGS) --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILD_STAMP)

# the CI command: every test
test: install
	$(VPY) -m pytest tests -q $(PYTEST_ARGS)

# no slow and no multi-process tests (markers registered in tests/conftest.py)
test-fast: install
	$(VPY) -m pytest tests -q -m "not slow and not distributed" $(PYTEST_ARGS)

# ruff, configured in pyproject.toml; needs no build of vlfast
lint: $(DEPS_STAMP)
	$(VPY) -m ruff check .

# the sm_90a compile gate (python -m vlfast.kernels.gate; no GPU): under the pinned triton, and under triton 3.6.0
# (the H200 image's version) in a venv of its own beside .venv: torch 2.13 (CPU wheel) + triton 3.6.0 from the
# local mirror, vlfast taken from this checkout by copying .venv's editable-install finder (no second build).
# .ci/run runs gate-triton36; the pinned triton's CI tier runs in tests/kernels/test_gate.py.
GATE36_VENV ?= .venv-triton36
GATE36_STAMP:= $(GATE36_VENV)/.deps-installed
GATE_ARGS  ?= --quiet

gate: install
	env -u TRITON_INTERPRET $(VPY) -m vlfast.kernels.gate $(GATE_ARGS)

$(GATE36_STAMP): Makefile
	test -x $(GATE36_VENV)/bin/python || $(PYTHON) -m venv $(GATE36_VENV)
	$(GATE36_VENV)/bin/python -m pip install $(PIP_FLAGS) torch==2.13.0 triton==3.6.0 "numpy>=1.22"
	touch $@

gate-triton36: install $(GATE36_STAMP)
	cp $$($(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/__editable__*vlfast* \
		$$($(GATE36_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/
	env -u TRITON_INTERPRET $(GATE36_VENV)/bin/python -m vlfast.kernels.gate $(GATE_ARGS)

bench: install
	$(VPY) -m vlfast bench $(BENCH_ARGS)

info: install
	$(VPY) -m vlfast info

# the one-call GPU check (bench/gpu_check.py), deliberately NOT on `install` or the venv: on a lent GPU machine
# (no network) the machine's own python3 and its torch/triton install vlfast in place (pip -e, offline; without
# the native extension if it cannot be built), run the GPU tests and `vlfast bench --device cuda` in under
# 8 minutes and write the jsonl, a log and gpu_check_summary.json to $OUT or bench/results. Without CUDA it
# exits 2; GPU_CHECK_ARGS=--dry-run prints the plan instead.
gpu-check:
	$(PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

# the end-to-end run on real data (bench/digits.py): scikit-learn's 8x8 digits (data shipped in the package, no
# download) as PNGs captioned with their class names, `vlfast train` of clip_micro, then `vlfast eval` zero-shot and
# retrieval on the held-out split; one JSON summary line, also in $(DIGITS_OUT)/summary.json (about a minute on 2 cores)
DIGITS_OUT ?= runs/digits
DIGITS_ARGS ?=
digits: install
	$(VPY) -m pip install $(PIP_FLAGS) scikit-learn
	$(VPY) -m vlfast.bench.digits --out $(DIGITS_OUT) $(DIGITS_ARGS)

clean:
	rm -rf build *.egg-info vlfast/_C*.so .ruff_cache $(GATE36_VENV)
