# Every target sets itself up: a fresh clone needs only python3 (3.11+) and make.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The versions the suite was run with (constraints.txt); pyproject.toml holds the users' bounds.
PIN := -c constraints.txt

.PHONY: install demo test newest bench bench-models bench-quality lint clean

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
CORPUS := bench-out/corpus
TRAIN := $(PY) bench/train_moe.py --threads 1 --fixed-threads --eval-every 250

# The bench models (bench/README.md): trained until more training no longer changes the
# ranking of the methods (docs/BENCHMARKS.md), each reused when bench-out/ holds it.
$(CORPUS)/manifest.json: | $(STAMP)
	$(PY) bench/corpus.py --out $(CORPUS)
$(MODELS)/mixtral-scratch/train_log.json: $(CORPUS)/manifest.json
	$(TRAIN) --kind scratch --family mixtral --steps 3000 --save-at 750,1500 --out $(@D)
$(MODELS)/mixtral-upcycled/train_log.json: $(CORPUS)/manifest.json
	$(TRAIN) --kind upcycled --family mixtral --steps 2000 --dense-steps 1000 --save-at 1000 \
		--out $(@D)
$(MODELS)/qwen2_moe-fine/train_log.json: $(CORPUS)/manifest.json
	$(TRAIN) --kind scratch --family qwen2_moe --experts 64 --top-k 6 --intermediate 128 \
		--shared-intermediate 512 --steps 1200 --save-at 600 --out $(@D)
# DeepSeek-V3's routing: sigmoid scores and a correction bias moved towards balance, no
# auxiliary loss
$(MODELS)/deepseek_v3-fine/train_log.json: $(CORPUS)/manifest.json
	$(TRAIN) --kind scratch --family deepseek_v3 --experts 64 --top-k 6 --intermediate 128 \
		--shared-intermediate 512 --steps 1200 --save-at 600 --out $(@D)
BENCH_MODELS := $(MODELS)/mixtral-scratch $(MODELS)/mixtral-upcycled $(MODELS)/qwen2_moe-fine
SIGMOID_MODEL := $(MODELS)/deepseek_v3-fine

bench-models: $(BENCH_MODELS:%=%/train_log.json) $(SIGMOID_MODEL)/train_log.json

QUALITY := $(PY) bench/quality.py
# docs/BENCHMARKS.md's quality tables: every method at half and a quarter of the experts on
# the mixed calibration; the default's candidates at three calibration sizes of one domain;
# the ranking at half the training steps.
bench-quality: bench-models
	$(QUALITY) $(BENCH_MODELS) --fractions 0.5 0.25 \
		--methods auto,o-prune,f-prune,msmoe,hc-smoe,mergemoe,ream,ream-balanced
	$(QUALITY) $(MODELS)/mixtral-scratch --fractions 0.5 --calib $(CORPUS)/calib-en.jsonl \
		--calib-tokens 8192 32768 65536 \
		--methods auto,o-prune,f-prune,o-prune-fit,f-prune-fit,msmoe-fit,hc-smoe,ream
	$(QUALITY) $(MODELS)/mixtral-scratch/step-1500 $(MODELS)/qwen2_moe-fine/step-600 \
		$(SIGMOID_MODEL)/step-600 $(SIGMOID_MODEL) \
		--fractions 0.5 --methods auto,o-prune,f-prune,ream

lint: $(STAMP)
	$(VENV)/bin/ruff check hcconvert kernels tests bench

clean:
	rm -rf $(VENV) $(NEWEST) build *.egg-info
