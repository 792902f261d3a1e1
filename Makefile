# DiTharos: `make demo` runs the platform end to end on the bundled sample clips;
# `make test` runs the test suite. Both create .venv (Python >= 3.11) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ditharos-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# The whole chain on the bundled sample clips: shards → a short CPU training run of the tiny
# DiT → nightly eval (samples, FVD, CLIP-score) → report.html. Re-running resumes / skips.
demo: $(STAMP)
	$(PY) pipeline/run.py
	$(PY) training/train.py --config training/configs/demo.yaml
	$(PY) eval/nightly.py --run runs/demo/train --config eval/configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) tests/bench/pipeline.py
	$(PY) tests/bench/packing.py
	$(PY) tests/bench/loader.py
	$(PY) tests/bench/fvd.py

clean:
	rm -rf runs .pytest_cache
