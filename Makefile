# One command each: `make run` (set up + tiny training run) and `make test` (set up + tests).
PY := .venv/bin/python
# DeepSpeed on machines without a GPU: CPU accelerator, gloo backend.
CPU_ENV := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo DS_ACCELERATOR=cpu)

.PHONY: setup run test lint
setup:
	@bash scripts/setup.sh

run: setup
	$(CPU_ENV) $(PY) train.py --config configs/gpu/tiny.yaml --hardware_config configs/hardware/cpu.yaml --max_steps 100

test: setup
	$(CPU_ENV) $(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check ava tests train.py train_rlhf.py
	$(PY) -m mypy ava
