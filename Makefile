# DiTharos: `make demo` runs the platform end to end on the bundled sample clips;
# `make test` runs the test suite. Both create .venv (Python >= 3.11) when missing and install
# exactly requirements.lock (`make lock` regenerates it from pyproject.toml's ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
STAMP := $(VENV)/.ditharos-installed

.PHONY: demo test bench gpu-check gpu-wheels lock clean

# The lock is the complete install (every package, test extras included); the repo itself goes
# on the venv's path through a .pth file rather than a setuptools editable build (which prints
# build-backend warnings on every install and fetches setuptools into a build env).
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r $(LOCK)
	@$(PY) -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'ditharos-repo.pth').write_text('$(CURDIR)\n')"
	@touch $(STAMP)

# The whole chain on the bundled sample clips: shards → a short CPU training run of the tiny
# DiT → nightly eval (samples, FVD, CLIP-score) → report.html. Re-running resumes / skips.
demo: $(STAMP)
	$(PY) pipeline/run.py
	$(PY) training/train.py --config training/configs/demo.yaml
	$(PY) eval/nightly.py --run runs/demo/train --config eval/configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) tests/bench/pipeline.py
	$(PY) tests/bench/tars.py
	$(PY) tests/bench/packing.py
	$(PY) tests/bench/loader.py
	$(PY) tests/bench/fvd.py
	$(PY) tests/bench/runlog.py

# The prepared GPU check (issue 13; tests/bench/gpu_check.py): production sizes on a CUDA machine,
# a dry run at tiny sizes elsewhere. It needs only torch + einops + numpy, so it runs with the venv
# when there is one and otherwise with the machine's own python3 (GPU machines come with torch).
# GPU machines have torch but no DeepSpeed or pytest, and no network: `make gpu-wheels` (here) puts
# their locked wheels for Python 3.12 into .gpu-wheels/ (git-ignored, ~14 MB with diffusers; the device tool
# carries it: carry [".gpu-wheels"]), and gpu-check installs them into .gpu-site/ there, which
# gpu_check.py puts after the machine's own site-packages (its torch and numpy stay in charge).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_OUT ?= runs/gpu-check
GPU_ARGS ?=  # e.g. --only=env,wan
GPU_WHEELS := deepspeed diffusers hjson msgpack ninja packaging psutil py-cpuinfo pydantic pydantic-core annotated-types \
	typing-extensions typing-inspection tqdm pytest pluggy iniconfig pygments
gpu-check:
	@if [ -d .gpu-wheels ] && ! $(GPU_PY) -c "import deepspeed" 2>/dev/null; then \
		$(GPU_PY) -m pip install --quiet --no-index --no-deps --target .gpu-site .gpu-wheels/*.whl; fi
	$(GPU_PY) tests/bench/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)

gpu-wheels: $(STAMP)
	rm -rf .gpu-wheels && mkdir -p .gpu-wheels
	grep -iE '^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==' $(LOCK) | grep -v '^deepspeed==' > .gpu-wheels/binary.txt
	DS_BUILD_OPS=0 $(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w .gpu-wheels $$(grep '^deepspeed==' $(LOCK))
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d .gpu-wheels -r .gpu-wheels/binary.txt

# Re-resolve pyproject.toml's ranges (newest releases pip may take here) into requirements.lock.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --dry-run --ignore-installed --report $(VENV)/lock-report.json -e '.[test,ocr]'
	$(PY) .ci/lock.py $(VENV)/lock-report.json $(LOCK)

clean:
	rm -rf runs .pytest_cache
