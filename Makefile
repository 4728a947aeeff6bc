# The README's commands. `make demo` and `make test` each set up .venv first on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch is installed before the project so pip does not pick a multi-GB CUDA build; override on
# GPU clusters, for example TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
STORAGE ?= runs

.PHONY: setup demo network-demo remask-demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/phases sweep search_spaces/ideal_gas.yaml --storage $(STORAGE)

network-demo: setup
	$(BIN)/phases sweep search_spaces/convnet_digits.yaml --storage $(STORAGE)

# Pretrains runs/mdm/denoiser.pt and reference.pt first if they are missing (about 30 minutes).
remask-demo: setup
	$(BIN)/phases sweep search_spaces/remask_code.yaml --storage $(STORAGE)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/isotropic.py
	$(BIN)/python bench/population.py
	$(BIN)/python bench/diffusion.py

clean:
	rm -rf $(VENV) build *.egg-info
