# make demo: create .venv, install, run the demo job.   make test: run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the builds on this machine's disk so the resolver never pulls another.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install schemas bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q $(TORCH_PINS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/g2face-pipe run jobs/demo.yaml

test: install
	$(PY) -m pytest -q -ra

schemas: install
	$(PY) -m pipeline.spec
	$(PY) -m pipeline.manifest

bench: install
	$(PY) bench/pipeline_throughput.py

clean:  # removes runs/: the demo outputs and demo key, and runs/train-lite
	rm -rf runs .pytest_cache
