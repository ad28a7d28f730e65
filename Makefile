# lit-act: two commands, `make train` and `make test`. Both create .venv if missing and install the project once.
PYTHON ?= python3.11
VENV ?= .venv
# CPU-capable torch by default; GPU users override, e.g. `make train TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,launchers,optuna
BENCH_DEPS ?= pandas
BENCH_NODEPS ?= pyhessian pykan rational-activations==0.2.0 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einops unfoldNd einconv linear_operator
# SAELens (bench_sae) and the parts of its import chain it needs; torch stays as installed (a pip constraint)
BENCH_DEPS += transformers~=4.57 datasets nltk plotly plotly-express fancy-einsum beartype better-abc typeguard rich sentencepiece accelerate einops jaxtyping simple-parsing tenacity python-dotenv docstring-parser wadler-lindig safetensors
BENCH_NODEPS += sae-lens==6.54.12 transformer-lens~=2.16 babe==0.0.7 transformers-stream-generator
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lit-act-installed

.PHONY: install train test test-all lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	WANDB_SILENT=true $(PY) train.py $(ARGS)

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow" $(ARGS)

test-all: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the reference implementations we compare against, installed into the venv for the benchmarks only
bench: $(STAMP)
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -c $(VENV)/torch-constraint.txt $(BENCH_DEPS)
	$(PY) -m pip install --quiet --no-deps $(BENCH_NODEPS)
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf outputs logs .pytest_cache
