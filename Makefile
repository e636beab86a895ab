# `make demo` and `make test` build .venv from requirements.txt on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := outputs/demo

.PHONY: demo demo-data demo-recon demo-stages demo-report test bench clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and pinned: anything that pulls an unpinned torch would fetch CUDA wheels
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests

# The pipeline on the embedded default: synthetic data, tiny offline model, CPU.
# Everything goes under outputs/demo/; each line is a command you can run on its own, and each
# part is a target of its own (demo-data, demo-recon, demo-stages, demo-report) for re-running it.
# The parts run one after the other: the reconstruction model trains 2.4x slower on one thread
# than on two, so running it beside the VLM stages would not save time on 2 cores.
DEMO_SCENES ?= 3200
DEMO_VIEWS ?= 2
DEMO_RECON_STEPS ?= 1800
DEMO_RECON_EVAL ?= 80
DEMO_STEP2_STEPS ?= 160
SUBMAKE = $(MAKE) --no-print-directory
demo: $(VENV)/.installed
	rm -rf $(DEMO)/data $(DEMO)/data.partial $(DEMO)/models $(DEMO)/checkpoints $(DEMO)/report $(DEMO)/recon \
		$(DEMO)/predictions $(DEMO)/stages
	$(SUBMAKE) demo-data
	$(SUBMAKE) demo-recon
	$(SUBMAKE) demo-stages
	$(SUBMAKE) demo-report

demo-data:
	$(PY) -m data_tools.synthocc --out $(DEMO)/data --scenes $(DEMO_SCENES) --views $(DEMO_VIEWS) --size 128 --seed 0
	$(PY) -m data_tools.contact_sheet --data $(DEMO)/data --out $(DEMO)/contact_sheet.png
	$(PY) -m step1_sft.make_data --data $(DEMO)/data --out $(DEMO)/stages/step1_train.jsonl
	$(PY) -m step1_sft.make_data --data $(DEMO)/data --out $(DEMO)/stages/step1_val.jsonl --split val
	$(PY) -m step2_multiquery.make_data --data $(DEMO)/data --out $(DEMO)/stages/step2_train.jsonl
	$(PY) -m data_tools.make_testset --data $(DEMO)/data --out $(DEMO)/stages/train_q1.jsonl --split train --questions Q1
	$(PY) -m data_tools.renders --data $(DEMO)/data --split train --no-progress
	$(PY) -m step4_selfconsistency.make_data --data $(DEMO)/data --out $(DEMO)/stages/step4_train.jsonl \
		--renders renders/oracle
	$(PY) -m data_tools.make_testset --data $(DEMO)/data --out $(DEMO)/stages/test.jsonl

# 3D reconstruction: train, evaluate against the true meshes (metrics.json, contact sheet)
demo-recon:
	$(PY) -m reconstruction.train --progress false --log_steps 300 --steps $(DEMO_RECON_STEPS)
	$(PY) -m reconstruction.evaluate --checkpoint $(DEMO)/recon/model --data $(DEMO)/data --split test \
		--limit $(DEMO_RECON_EVAL) --out $(DEMO)/recon/metrics.json --sheet $(DEMO)/recon/contact_sheet.png --no-progress

# the vision-language model: stages 1-4, each from the previous stage's checkpoint
demo-stages:
	$(PY) -m occmllm.tiny --out $(DEMO)/models/tiny --image-size 64
	PYTHON=$(PY) bash step1_sft/run.sh --disable_tqdm true
	PYTHON=$(PY) bash step2_multiquery/run.sh --disable_tqdm true --max_steps $(DEMO_STEP2_STEPS)
	$(PY) inference.py --checkpoint step2=$(DEMO)/checkpoints/step2 --data $(DEMO)/stages/train_q1.jsonl \
		--out $(DEMO)/predictions/step2_train --batch-size 32
	$(PY) -m step3_mpo.make_data --data $(DEMO)/data --out $(DEMO)/stages/step3_train.jsonl \
		--predictions $(DEMO)/predictions/step2_train/predictions.jsonl
	PYTHON=$(PY) bash step3_mpo/run.sh --disable_tqdm true
	OMP_NUM_THREADS=1 PYTHON=$(PY) bash step4_selfconsistency/run.sh --disable_tqdm true

# one report: every checkpoint in plain mode, then stages 2 and 4 with chain of thought
demo-report:
	$(PY) inference.py --checkpoint base=$(DEMO)/models/tiny --checkpoint step1=$(DEMO)/checkpoints/step1 \
		--checkpoint step2=$(DEMO)/checkpoints/step2 --checkpoint step3=$(DEMO)/checkpoints/step3 \
		--checkpoint step4=$(DEMO)/checkpoints/step4 --data $(DEMO)/stages/test.jsonl --out $(DEMO)/report --batch-size 32
	$(PY) inference.py --checkpoint step2=$(DEMO)/checkpoints/step2 --checkpoint step4=$(DEMO)/checkpoints/step4 \
		--mode cot --recon $(DEMO)/recon/model --data $(DEMO)/stages/test.jsonl --out $(DEMO)/report --batch-size 32
	@echo
	@echo "dataset:        $(DEMO)/data  (manifest.jsonl, splits.json, dataset.json, scenes/)"
	@echo "contact sheet:  $(DEMO)/contact_sheet.png"
	@echo "stage files:    $(DEMO)/stages/  (each .jsonl with its InternVL .meta.json)"
	@echo "reconstruction: $(DEMO)/recon/  (model/, metrics.json, contact_sheet.png)"
	@echo "checkpoints:    $(DEMO)/models/tiny (base), $(DEMO)/checkpoints/step1 ... step4"
	@echo "report:         $(DEMO)/report/  (report.md, report.json, plots; renders/ for chain of thought)"

# synthocc needs nothing; the others read the models and files `make demo` writes
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_synthocc.py
	$(PY) benchmarks/bench_recon.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_train.py

clean-demo:
	rm -rf $(DEMO)
