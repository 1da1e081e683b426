# Two entry points, each creating its own virtual environment:
#   make demo   the main job (sample data, pretraining, fine-tuning, Dice table, figure)
#   make test   the test suite
# CPU machines get the CPU build of PyTorch pinned below; on a GPU machine install the CUDA
# build of the same version first (see README, "GPU install") and run with TORCH=.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_INDEX = $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test install lint

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)

	$(PY) -m pip install -q $(PIP_TORCH_INDEX) $(TORCH) -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/medssl3d demo

# pytest exits 5 when a selection collects no test; that is not a failure of the suite.
test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check medssl3d tests
