# Every set-up step lives here, so `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.herd-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# apt-get needs root: sudo when not root
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup model run test test-slow test-all browser netns bench finetune-demo vision-demo clean peers screenshots

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The pinned CPU torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build. The test extra
# holds every test dependency, llama-cpp-python (the llama.cpp reference) included: pip builds that one from source
# with the machine's gcc (about 5 minutes once, then cached by pip).
$(STAMP): $(VENV)/bin/python pyproject.toml $(wildcard setup.py)
	$(PIP) install -q torch==2.13.0
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -e '.[test]'
	touch $@

# Headless Chromium and its WebDriver from Debian, for the web page's browser test and `make screenshots`;
# nothing to do once /usr/bin/chromedriver exists.
CHROMEDRIVER := /usr/bin/chromedriver
$(CHROMEDRIVER):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver

browser: $(CHROMEDRIVER)

# `ip netns` for the two-node pretraining test (tests/test_pretrain_scale.py; needs root): Debian's iproute2
IP := /bin/ip
$(IP):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends iproute2

netns: $(IP)

setup: $(STAMP)

model: $(STAMP)
	$(PY) -m herd pull smollm2-135m-instruct

run: model
	$(PY) -m herd chat

# HERD_STRICT=1 (tests/conftest.py): a skipped test is a failed test, so a green run means every test ran.
# `make test` runs every test, the slow marks included, except the two training runs below; `make test-all` runs
# `make test` and then those. CI (.ci/run) runs `make test test-all`: each test once.
# The slow marks folded into `make test` took 29 minutes together (soak 412 s, PEFT on the default model 369 s,
# 2-thread batch invariance 268 s, ...) at load average 15-19 on 2 cores, about 6x their ~5 quiet minutes.
SLOWEST := \
	tests/test_vision_train.py::test_demo_schedule_reaches_the_targets \
	tests/test_pretrain_scale.py::test_fsdp_checkpoint_reshards_with_the_same_logits[fsdp4] \
	tests/test_pretrain.py::test_four_process_layouts \
	tests/test_finetune_defaults.py::test_defaults_teach_the_default_model_new_facts
# vision demo: ~10 minutes quiet (past its 1800 s timeout at load ~17); finetune defaults: 120 steps, minutes quiet
STRICT := HERD_STRICT=1

test: model browser netns
	$(STRICT) $(PY) -m pytest -q -m "" $(addprefix --deselect ,$(SLOWEST))

test-all: test
	$(STRICT) $(PY) -m pytest -q -m "" $(SLOWEST)

# the slow marks alone (by hand)
test-slow: model browser netns
	$(STRICT) $(PY) -m pytest -q -m slow

# herd vs llama.cpp's own llama-bench (built by `make peers`) on the default model: benchmarks/results/
bench: model peers
	$(PY) benchmarks/bench_cpu.py

# LoRA on the default model teaches it facts about a fictional organisation (examples/zephyrine); prints
# exact-answer accuracy on held-out questions before and after.
finetune-demo: model
	$(PY) examples/finetune_demo.py

# Trains a small early-fusion vision encoder (+ LoRA) on generated images and reports held-out accuracy.
vision-demo: model
	$(PY) examples/vision_demo.py

# The debug preset pretrained from scratch on the shipped corpus under torchrun (2 processes, FSDP2), exported to HF
# and sampled with herd generate; loss curve in runs/pretrain-demo/run/loss.png. About a minute on 2 idle cores.
.PHONY: pretrain-demo distill-demo
pretrain-demo: model
	$(PY) examples/pretrain_demo.py

# A student of 8 of the default model's 30 layers, distilled from it vs trained on CE alone: held-out KL and top-1
# agreement with the teacher before and after (the distilled one must end closer). A few minutes on 2 cores.
distill-demo: model
	$(PY) examples/distill_demo.py

# The chat page in headless Chromium (Debian's chromium and chromium-driver), mid-conversation, taken by the same
# browser session as tests/test_web_page.py: docs/chat-page.png.
screenshots: model
	HERD_SCREENSHOT=docs/chat-page.png $(PY) -m pytest -q tests/test_web_page.py

# llama.cpp's own tools (llama-bench, llama-server, llama-perplexity, llama-quantize, llama-batched-bench),
# built natively from the llama.cpp that the pinned llama-cpp-python sdist vendors: the peers in
# benchmarks/peers.py. About 8 minutes on 2 cores, once; flags and versions go to .peers/BUILD_INFO.json.
PEERS := .peers
PEERS_VERSION := 0.3.36
PEERS_JOBS ?= 2
PEERS_STAMP := $(PEERS)/.built-$(PEERS_VERSION)

$(PEERS_STAMP): benchmarks/build_peers.py
	$(PYTHON) benchmarks/build_peers.py --out $(PEERS) --version $(PEERS_VERSION) --jobs $(PEERS_JOBS)
	touch $@

peers: $(PEERS_STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
