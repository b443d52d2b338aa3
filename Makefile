# Every target sets itself up: a fresh clone needs only python3 (3.10+) and make.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch; an unpinned torch would pull a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hcconvert.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_kernel.py

lint: $(STAMP)
	$(VENV)/bin/ruff check hcconvert kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info
