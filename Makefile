# Every target sets itself up: a fresh clone needs only python3 (3.10+) and make.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-quality lint clean

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
	rm -rf $(VENV) build *.egg-info
