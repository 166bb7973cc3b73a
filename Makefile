# Two commands set everything up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ./memflow-data
HOST ?= 127.0.0.1
PORT ?= 50051
STAMP := $(VENV)/.installed
# `make bench QUICK=1` runs every benchmark in its --quick form
# `make test` runs pytest on TEST_WORKERS processes (pytest-xdist; a test file stays on one, so its fixtures start
# once): most of the suite's time is spent waiting on real servers (leases, kills, restarts), not on the CPU
TEST_WORKERS ?= 2
BENCH_FLAGS := $(if $(QUICK),--quick,)

.PHONY: run test install proto bench demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m memory_service.cli serve --data-dir $(DATA_DIR) --host $(HOST) --port $(PORT)

# the Node interop test's packages (tests/interop/package-lock.json); without npm that test skips and says why
test: $(STAMP)
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error \
	|| echo "npm ci failed: tests/service/test_interop_node.py will skip (see npm's error above)"; else echo "npm not found: tests/service/test_interop_node.py will skip (install node and npm to run it)"; fi
	@# Mooncake's wheel (the hot tier's tests) needs libibverbs1 even over TCP; CI runs as root with Debian's registry
	@if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 '; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q libibverbs1 >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libibverbs1 >/dev/null 2>&1; } \
	    || echo "apt-get install libibverbs1 failed: the Mooncake tests will skip"; \
	  else echo "libibverbs1 is missing (apt-get install libibverbs1, as root): the Mooncake tests will skip"; fi; fi
	$(PY) -m ruff check memory_service plugin tests benchmarks
	$(PY) -m mypy memory_service plugin
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

proto: $(STAMP)
	$(PY) protos/generate.py

# one install of both extras (the text encoder for retrieval_quality); it covers what $(STAMP) stands for
$(VENV)/.quality: $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,quality]'
	touch $(STAMP) $@

bench: $(VENV)/.quality
	$(PY) benchmarks/bank_growth.py $(BENCH_FLAGS)
	$(PY) benchmarks/pruning_growth.py $(BENCH_FLAGS)
	$(PY) benchmarks/retrieval_quality.py $(BENCH_FLAGS)
	$(PY) benchmarks/overhead.py $(BENCH_FLAGS)
	$(PY) benchmarks/transport.py $(BENCH_FLAGS)
	$(PY) benchmarks/baseline.py $(BENCH_FLAGS)  # the hand-built FAISS/numpy + LMDB baseline of issue 15, side by side
	$(PY) benchmarks/node_load.py --quick  # its full form (Wan's 1560 tokens, ~17 GB of RAM) is a GPU node's
	$(PY) benchmarks/report.py

demo: $(STAMP)
	$(PY) benchmarks/demo.py --service

clean:
	rm -rf $(VENV) build *.egg-info
