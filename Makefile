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

# The pipeline on the embedded default: synthetic data, CPU. Everything goes under outputs/demo/.
demo: $(VENV)/.installed
	rm -rf $(DEMO)/data $(DEMO)/data.partial
	$(PY) -m data_tools.synthocc --out $(DEMO)/data --scenes 160 --views 10 --seed 0
	$(PY) -m data_tools.contact_sheet --data $(DEMO)/data --out $(DEMO)/contact_sheet.png
	$(PY) -m step1_sft.make_data --data $(DEMO)/data --out $(DEMO)/stages/step1_train.jsonl
	$(PY) -m step1_sft.make_data --data $(DEMO)/data --out $(DEMO)/stages/step1_val.jsonl --split val
	$(PY) -m step2_multiquery.make_data --data $(DEMO)/data --out $(DEMO)/stages/step2_train.jsonl
	$(PY) -m data_tools.renders --data $(DEMO)/data --split train --no-progress
	$(PY) -m step4_selfconsistency.make_data --data $(DEMO)/data --out $(DEMO)/stages/step4_train.jsonl \
		--renders renders/oracle
	$(PY) -m data_tools.make_testset --data $(DEMO)/data --out $(DEMO)/stages/test.jsonl
	@echo
	@echo "dataset:        $(DEMO)/data  (manifest.jsonl, splits.json, dataset.json, scenes/)"
	@echo "contact sheet:  $(DEMO)/contact_sheet.png"
	@echo "stage files:    $(DEMO)/stages/  (each .jsonl with its InternVL .meta.json)"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_synthocc.py

clean-demo:
	rm -rf $(DEMO)
