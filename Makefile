# Every target sets itself up: a fresh clone needs only python3 (3.11+) and make.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The versions the suite was run with (constraints.txt); pyproject.toml holds the users' bounds.
PIN := -c constraints.txt

.PHONY: install demo test newest bench bench-quality lint clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	# The CPU build of torch; an unpinned torch would pull a CUDA build of several GB.
	$(PY) -m pip install -q $(PIN) torch==2.13.0
	$(PY) -m pip install -q $(PIN) -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hcconvert.cli.demo

test: $(STAMP)
	$(PY) -m pytest -q

# The newest versions pyproject.toml allows, in a venv of their own, through the whole suite,
# then every dependency whose newest release lies beyond those bounds: run it before widening
# a bound or refreshing constraints.txt, so the next release is caught here, not by a user.
NEWEST := .venv-newest
newest:
	rm -rf $(NEWEST)
	python3 -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q torch==2.13.0
	$(NEWEST)/bin/python -m pip install -q --upgrade -e ".[dev]"
	$(NEWEST)/bin/python -m pytest -q
	$(NEWEST)/bin/python -m pip list --outdated  # newer than the bounds allow

bench: $(STAMP)
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_kernel.py

MODELS := bench-out/models

bench-quality: $(STAMP)
	$(PY) bench/corpus.py --out bench-out/corpus
	$(PY) bench/train_moe.py --kind scratch --family mixtral --minutes 4 --out $(MODELS)/mixtral-scratch
	$(PY) bench/train_moe.py --kind upcycled --family mixtral --minutes 4 --out $(MODELS)/mixtral-upcycled
	$(PY) bench/train_moe.py --kind scratch --family qwen2_moe --steps 300 --fixed-threads \
		--out $(MODELS)/qwen2_moe-scratch
	$(PY) bench/router_table.py --model $(MODELS)/mixtral-scratch \
		--calib bench-out/corpus/calib.jsonl --eval bench-out/corpus/eval.txt
	$(PY) bench/quality.py $(MODELS)/mixtral-scratch $(MODELS)/mixtral-upcycled $(MODELS)/qwen2_moe-scratch

lint: $(STAMP)
	$(VENV)/bin/ruff check hcconvert kernels tests bench

clean:
	rm -rf $(VENV) $(NEWEST) build *.egg-info
