# The two quick-start commands: `make demo` and `make test`.
# Each creates (or reuses) .venv and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench-smoke clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch/torchvision pinned to the builds pip finds on this machine's disk.
	$(VENV)/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(VENV)/bin/python -m pip install --quiet -e ".[demo,test,export]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vtp demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info runs
