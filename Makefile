# Two commands on a fresh machine:  `make demo`  (the main job)  and  `make test`  (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/edge-qmul: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install demo test test-slow test-arm test-federated test-all lint
install: $(BIN)/edge-qmul

demo: install
	$(BIN)/edge-qmul demo --forget-class 3

lint: install
	$(BIN)/ruff check edge_qmul export federated devices tests bench
	$(BIN)/mypy edge_qmul export devices federated
	$(BIN)/pytest -q -p no:cacheprovider tests/test_layers.py   # the import contract (ARCHITECTURE.md §2)

test: lint
	$(BIN)/pytest -q -m "not slow and not federated and not arm"

# Slow tests (minutes): bench/table.py end to end on a CIFAR-10 directory in the real format (~1.5 min).
test-slow: install
	$(BIN)/pytest -q -m slow

# ARM emulation (qemu aarch64, ARCHITECTURE.md §7): builds a cached sysroot outside the repo; needs root once.
test-arm: install
	bash devices/arm/build_sysroot.sh
	$(BIN)/pytest -q -m arm

# Real Flower deployment on loopback: a TLS flower-superlink with SuperNode authentication, 3 registered
# flower-supernode processes (+ an unregistered one it refuses) and flwr run (~6 min on 2 cores); and the same
# apps on 20 virtual devices under Flower's simulation engine (tests/test_fleet_simulation.py, ~3 min).
test-federated: install
	$(BIN)/pytest -q -m federated --durations=5

test-all: lint
	$(BIN)/pytest -q
