# DiTharos: `make demo` runs the platform end to end on the bundled sample clips;
# `make test` runs the test suite. Both create .venv (Python >= 3.11) when missing and install
# exactly requirements.lock (`make lock` regenerates it from pyproject.toml's ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
STAMP := $(VENV)/.ditharos-installed

.PHONY: demo test bench lock clean

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
	$(PY) tests/bench/packing.py
	$(PY) tests/bench/loader.py
	$(PY) tests/bench/fvd.py

# Re-resolve pyproject.toml's ranges (newest releases pip may take here) into requirements.lock.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --dry-run --ignore-installed --report $(VENV)/lock-report.json -e '.[test]'
	$(PY) .ci/lock.py $(VENV)/lock-report.json $(LOCK)

clean:
	rm -rf runs .pytest_cache
