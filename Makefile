# `make test` and friends create .venv when missing and install the project into it (quick when
# nothing changed: a stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xft_dist-installed
PYTEST_ARGS ?=
CONFIG ?= configs/tiny.yaml

# DeepSpeed JIT-compiles a small C++ op on its first distributed init; cache it inside the repo.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test lint pretrain gpu-smoke clean

# The default corpus: the Python standard library's top-level modules, tokenized to bytes.
STDLIB = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch, deepspeed, xft_dist" || { echo "install failed"; exit 1; }
	@# Build DeepSpeed's CPU communication op now (cached in TORCH_EXTENSIONS_DIR), not in the first run.
	@DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as g; \
		b = g().create_op_builder('ShareMemCommBuilder'); b and b.load()" >/dev/null 2>&1 || true
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

data/stdlib/valid/manifest.json: | $(STAMP)
	$(PY) tools/make_shards.py $(STDLIB)/*.py --out data/stdlib --shard-tokens 250000 --valid-fraction 0.05 \
		--overwrite --quiet

pretrain: $(STAMP) data/stdlib/valid/manifest.json
	WANDB_MODE=offline OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu \
		$(VENV)/bin/deepspeed --num_gpus 2 launch/pretrain.py --config $(CONFIG) $(ARGS)

# The first run on a GPU machine: GPU tests, 30 bf16 steps of gpt_125m, the GPT-2-small bench.
gpu-smoke: $(STAMP)
	$(PY) tools/gpu_smoke.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
