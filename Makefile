# PartReID: PASS pre-training + PPLR unsupervised fine-tuning.
# `make install` sets up .venv; `make test` runs the suite; `make demo` runs the whole chain.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Stock PyPI torch (its CUDA build also runs on a CPU-only machine) and the torchvision built for it.
# "===" pins the plain PyPI build, so that a local "+cpu" wheel without a matching torchvision is not picked.
TORCH_SPEC ?= torch===2.13.0 torchvision==0.28.0

.PHONY: install test demo bench clean help

help:
	@echo "targets: install test demo bench clean"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

bench: install
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

demo: install
	@echo "make demo will run: pass-pretrain (vit_tiny) -> extract-features | cluster | refine-labels -> finetune -> cluster"

clean:
	rm -rf $(VENV) demo_out build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
