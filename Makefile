# fidmed: the two set-up commands of the README.
#   make demo   creates .venv if missing, installs fidmed, runs the demo job (python run.py experiment=demo)
#   make test   creates .venv if missing, installs fidmed with its test extras, runs the fast test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch and torchvision are installed together, at versions that match each other.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.fidmed-installed

.PHONY: demo test test-all install clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[medical,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) run.py experiment=demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 FIDMED_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 FIDMED_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m "not gpu"

clean-outputs:
	rm -rf outputs
