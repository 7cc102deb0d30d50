# The two commands: `make demo` and `make test`. Each creates .venv and installs what is missing:
# `make demo` what the demo runs (the demo extra), `make test` the dev extra too (the test tools,
# the benchmarks' peers, the object-store server); a venv with the dev extra serves both.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench browser gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[demo]'
	touch $(DEMO_STAMP)

venv: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/mm1 demo

# The report's browser test drives Debian's chromium through chromedriver: installed when missing
# (apt-get, as root or through sudo without a password); without them that test fails, saying so.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  $$SUDO sh -c '$(APT_INSTALL) >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && $(APT_INSTALL) >/dev/null 2>&1)' \
	  || echo "make: could not install chromium and chromium-driver (apt-get); the report's browser test will fail"; }

# One process per core (at most 4), whole files to a process: a file's module fixtures (a torchrun
# launch, a curated run) are built once; each process has its own session fixtures, except what
# tests/conftest.py builds once for all of them (the demo and its training run, the tiny models).
# Files go out longest first (tests/conftest.py LONGEST_FILES; --no-loadscope-reorder keeps that
# order instead of xdist's by test count). The suite is CPU-bound. Plain `pytest` runs serially,
# as a debugger wants.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python -m tools.bench.partition_memory

# What the GPU machines (Python 3.12, torch 2.11, no registry) lack for tools/bench/gpu_suite.py:
# open_clip (its torch, torchvision, timm, regex, tqdm, huggingface_hub and safetensors are there)
# with ftfy + wcwidth, and pydantic (train/recipe.py, the curate stages) with its parts;
# typing_extensions because pydantic needs >= 4.16; pyahocorasick because importing the stages'
# registry imports metaclip_balance's matcher. cp312 wheels, pinned to what the tests ran,
# 5.1 MiB; a device call carries build/gpu_wheels (tools/bench/gpu_suite.py says how).
GPU_WHEELS := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 pydantic==2.14.4 pydantic-core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 pyahocorasick==2.3.1
gpu-wheels: $(STAMP)
	rm -rf build/gpu_wheels
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d build/gpu_wheels $(GPU_WHEELS)
	du -sh build/gpu_wheels

clean:
	rm -rf $(VENV) build demo_out
