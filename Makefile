# grokctl — every target sets itself up from a bare checkout.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo-ckpt
PYTEST_ARGS ?=

.PHONY: install kernels demo test test-fast lint format clean

install: $(STAMP) kernels

# Native CPU kernels (grokctl/kernels/_build/); a failed build only means the pure-JAX path.
kernels: $(STAMP)
	$(BIN)/python -m grokctl.kernels.build

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/grokctl random-checkpoint $(DEMO) --preset grok-demo --seed 0 --force
	$(BIN)/grokctl generate --checkpoint $(DEMO) --prompt "The answer to life the universe and everything is" --max-tokens 32 --temperature 0.8 --seed 1

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -m 'not slow' $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check grokctl tests benchmarks
	$(BIN)/ruff format --check grokctl tests benchmarks
	$(BIN)/mypy grokctl

format: install
	$(BIN)/ruff format grokctl tests benchmarks
	$(BIN)/ruff check --fix grokctl tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO) grokctl/kernels/_build .pytest_cache .ruff_cache .mypy_cache
