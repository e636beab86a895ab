# `make demo` and `make test` build .venv from requirements.txt on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := outputs/demo

.PHONY: demo test bench clean-demo

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
# Everything goes under outputs/demo/; each line is a command you can run on its own.
DEMO_SCENES ?= 3200
DEMO_VIEWS ?= 2
demo: $(VENV)/.installed
	rm -rf $(DEMO)/data $(DEMO)/data.partial $(DEMO)/models $(DEMO)/checkpoints $(DEMO)/report
	$(PY) -m data_tools.synthocc --out $(DEMO)/data --scenes $(DEMO_SCENES) --views $(DEMO_VIEWS) --size 128 --seed 0
	$(PY) -m data_tools.contact_sheet --data $(DEMO)/data --out $(DEMO)/contact_sheet.png
	$(PY) -m step1_sft.make_data --data $(DEMO)/data --out $(DEMO)/stages/step1_train.jsonl
	$(PY) -m step1_sft.make_data --data $(DEMO)/data --out $(DEMO)/stages/step1_val.jsonl --split val
	$(PY) -m step2_multiquery.make_data --data $(DEMO)/data --out $(DEMO)/stages/step2_train.jsonl
	$(PY) -m data_tools.renders --data $(DEMO)/data --split train --no-progress
	$(PY) -m step4_selfconsistency.make_data --data $(DEMO)/data --out $(DEMO)/stages/step4_train.jsonl \
		--renders renders/oracle
	$(PY) -m data_tools.make_testset --data $(DEMO)/data --out $(DEMO)/stages/test.jsonl
	$(PY) -m occmllm.tiny --out $(DEMO)/models/tiny --image-size 64
	PYTHON=$(PY) bash step1_sft/run.sh --disable_tqdm true
	$(PY) inference.py --checkpoint base=$(DEMO)/models/tiny --checkpoint step1=$(DEMO)/checkpoints/step1 \
		--data $(DEMO)/stages/test.jsonl --out $(DEMO)/report
	@echo
	@echo "dataset:        $(DEMO)/data  (manifest.jsonl, splits.json, dataset.json, scenes/)"
	@echo "contact sheet:  $(DEMO)/contact_sheet.png"
	@echo "stage files:    $(DEMO)/stages/  (each .jsonl with its InternVL .meta.json)"
	@echo "checkpoints:    $(DEMO)/models/tiny (base), $(DEMO)/checkpoints/step1"
	@echo "report:         $(DEMO)/report/  (report.md, report.json, plots)"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_synthocc.py

clean-demo:
	rm -rf $(DEMO)
