# Two commands a new user needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= out/demo

# Nothing wb does may reach the Hugging Face hub: models are built from shipped configs.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/wb demo -o $(DEMO)
	@echo "open $(DEMO)/index.html"

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	# One OpenMP thread: the 2-process tests fork the pytest process, and a forked child of a process
	# whose GNU OpenMP pool has run can hang (libgomp is not fork-safe); it also spares 2-core CI.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
