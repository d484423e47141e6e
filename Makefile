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
	@echo "targets: install test demo bench clean $(REPRODUCE)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[dev,export]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

bench: install
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

DEMO_OUT ?= demo_out
DATA ?=
demo: install
	@bash tools/demo.sh $(DEMO_OUT) "$(DATA)"

# Paper reproductions: make reproduce-pplr-market REID_DATA=/data GPUS=4
REPRODUCE := reproduce-pass-small reproduce-pass-base reproduce-pplr-market reproduce-pplr-msmt \
             reproduce-pplr-resnet-market reproduce-pass-usl-market reproduce-pass-usl-msmt
.PHONY: $(REPRODUCE)
$(REPRODUCE): install
	@BIN=$(BIN) GPUS=$(or $(GPUS),1) bash tools/reproduce.sh $@

clean:
	rm -rf $(VENV) demo_out build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
