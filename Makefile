# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
CHECKPOINT ?= checkpoints/swissroll.pt

.PHONY: serve test train train-seed train-cond distill lint openapi bench-quality bench-conditional bench-speed bench-load bench-distillation clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps make re-runs instant; pyproject.toml changes reinstall. torch is pinned in pyproject.toml.
$(VENV)/.runtime: pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.runtime

serve: $(VENV)/.runtime
	$(VENV)/bin/swissroll-serve

test: $(VENV)/.dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# After changing a route, parameter or response model (or merging branches that did): refresh the committed spec.
openapi: $(VENV)/.runtime
	$(PY) -m service.openapi_export

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

train: $(VENV)/.dev
	$(PY) -m training --preset default --epochs 300 --ema-decay 0.995 --seed 0 --out $(CHECKPOINT)

# Few-step students of the default (training/distill.py): both methods compared, the best kept. ~10 min, 2 cores.
distill: $(VENV)/.dev
	$(PY) -m training.distill --teacher $(CHECKPOINT) --out checkpoints/swissroll-fast.pt

bench-distillation: $(VENV)/.dev
	$(PY) -m bench.distillation

# The conditional model (issue 15): position along the roll as input, 30% condition dropout, served as swissroll-cond.
train-cond: $(VENV)/.dev
	$(PY) -m training --preset cond --epochs 300 --ema-decay 0.995 --condition-dropout 0.3 --seed 0 --no-evaluate \
		--out checkpoints/swissroll-cond.pt

bench-conditional: $(VENV)/.dev
	$(PY) -m bench.conditional

# The original notebook's network (raw time input, epsilon prediction, no residuals), 100 epochs, with our fixed
# loop: served beside the default as `swissroll-seed`, so the default's changes can be compared on the page.
train-seed: $(VENV)/.dev
	$(PY) -m training --preset seed --epochs 100 --seed 0 --out checkpoints/swissroll-seed.pt

bench-quality: $(VENV)/.dev
	$(PY) -m bench.quality

bench-speed: $(VENV)/.dev
	$(PY) -m bench.speed

bench-load: $(VENV)/.dev
	$(PY) -m bench.load

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
