# One-command set-up: every target that needs Python fills .venv first.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build (from PyTorch's CPU wheel index,
# or a local find-links copy of the same wheel; only torch itself, its dependencies come from the normal
# index with the project's) so the
# install does not download a multi-gigabyte CUDA wheel.
PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DATA    ?= data/sample
RUN     ?= runs/debug

.PHONY: install test test-slow corpus train bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py tokenizer/_lists.c
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q --no-deps "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow"

# Rebuilt when the manifest, the sample files or the code that writes the shards change (--force: the
# build otherwise refuses an --out made from other inputs or settings).
SAMPLE_INPUTS := corpus_manifests/sample.yaml $(shell find corpus_manifests/sample -type f -not -name '*.pyc') \
	$(wildcard pipeline/*.py pipeline/dedup/*.py tokenizer/*.py)
$(DATA)/index.json: $(STAMP) $(SAMPLE_INPUTS)
	$(PY) pipeline/build.py --manifest corpus_manifests/sample.yaml --out $(DATA) --force

corpus: $(DATA)/index.json

train: $(DATA)/index.json
	rm -rf $(RUN)
	$(PY) trainer/fit.py --config trainer/configs/debug.yaml --data $(DATA) --run-dir $(RUN)

# Peers for the CPU benchmarks live in their own venv: datatrove pins packages (xxhash<4) that
# would clash with the project's.
PEERS := .venv-peers/.installed
$(PEERS):
	python3 -m venv .venv-peers
	.venv-peers/bin/pip install -q datatrove spacy regex orjson tokenizers "xxhash<4"
	touch $(PEERS)

bench: $(STAMP) $(PEERS)
	$(PY) bench/tokenizer.py
	$(PY) bench/pipeline.py --datatrove-python .venv-peers/bin/python
	$(PY) bench/dedup.py --datatrove-python .venv-peers/bin/python
	$(PY) bench/loader.py

lint: $(STAMP)
	$(PY) -m ruff check .

# Only what these targets make: other corpora in data/ and runs in runs/ are the user's and stay.
clean:
	rm -rf .venv .venv-peers $(DATA) $(RUN) build *.egg-info .pytest_cache .ruff_cache tokenizer/_lists*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
