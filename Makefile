# `make demo` and `make test` build .venv from requirements.txt on first use.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := outputs/demo

# On x86 CPUs with AVX2, every float kernel runs its AVX2 code path, whatever else the CPU offers:
# PyTorch's own kernels, MKL's matrix products (on AMD CPUs MKL otherwise takes another path) and
# oneDNN's convolutions each pick a path by CPU, and each path rounds differently, so the same demo
# gave other answers on other machines. Set any of them before make to choose otherwise.
ifneq ($(shell grep -m1 -ow avx2 /proc/cpuinfo 2>/dev/null),)
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2
export ONEDNN_MAX_CPU_ISA ?= AVX2
endif
# glibc's malloc gives a freed large block (a step's activations and gradients) back to the kernel,
# and the next step faults the same pages in again, zeroed: on the demo's tiny models that was up to
# a sixth of a training step (stage 3). Large blocks stay in the heap instead (never returned before
# exit); the same results, bit for bit (benchmarks/RESULTS.md, "The demo's time on a slower machine")
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736

.PHONY: demo demo-data demo-recon demo-stages demo-stage3 demo-report demo-alpha demo-fresh test bench bench-gpu bench-gpu-next clean-demo base recon-base \
	demo-recon-test demo-recon-heldout demo-report-val demo-report-val-renders demo-report-val-plain demo-report-test \
	demo-report-test-plain demo-alpha-val demo-alpha-test demo-fresh-renders demo-fresh-plain

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and pinned: anything that pulls an unpinned torch would fetch CUDA wheels
	$(VENV)/bin/pip install --quiet --no-compile torch==2.13.0
	$(VENV)/bin/pip install --quiet --no-compile -r requirements.txt
	# the bytecode pip would write file by file, on every core (about 20 s sooner on 2 cores); as with
	# pip, a file written for a newer Python (torch ships one) stays uncompiled
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests

# The pipeline on the embedded default: synthetic data, tiny offline model, CPU.
# Everything goes under outputs/demo/; each line is a command you can run on its own, and each
# part is a target of its own (demo-data, demo-recon, demo-stages, demo-report, demo-alpha) for re-running it.
# The parts run one after the other: reconstruction training (DEMO_RECON_STEPS > 0) is far slower
# on one thread than on two, so running it beside the VLM stages would not save time on 2 cores
# (benchmarks/RESULTS.md, "Figures behind settings in the code"). Within a part, inference and the
# reconstruction's renders run two jobs at a time (DEMO_JOBS), each on its share of the cores: on
# the demo's tiny models one such job keeps about one core busy whatever its thread count, and gives
# the same files on one thread as on two (benchmarks/RESULTS.md, "Two jobs at a time"). Training
# keeps every core, since on fewer it rounds otherwise. DEMO_JOBS=1 runs every command in turn.
DEMO_SCENES ?= 3200
DEMO_VIEWS ?= 2
# scenes drawn after the 3,200 for test alone, then for validation alone (data_tools.synthocc
# --extra-test-scenes, --extra-val-scenes): 1,280 views in each split, so a paired gain of 3 points
# on the whole split, and about 5 on its most-occluded third, is more than twice its standard error,
# and settings are chosen on twice the views; the training scenes are the same with or without them
DEMO_EXTRA_TEST_SCENES ?= 320
DEMO_EXTRA_VAL_SCENES ?= 320
# the reconstruction model starts from the shipped pretrained one (RECON_BASE below); 0 steps uses
# it as it is, N > 0 fine-tunes it N steps on the demo's training views
DEMO_RECON_STEPS ?= 0
# stage 2 for 320 steps: at 160 a second training seed never learnt Q2-Q4 (benchmarks/RESULTS.md,
# "A second training seed")
DEMO_STEP2_STEPS ?= 320
# stage 3 (MPO) is left out of the demo's chain, as every step is that shows no gain on validation:
# it changed 2 of the 1,280 validation answers (1 gained, 1 lost), and stage 4 trained from stage 2
# reads what stage 4 from stage 3 reads, asked plainly and with its chain (benchmarks/RESULTS.md,
# "Stage 3 left out of the demo"). DEMO_STAGE3=1 runs the published four stages, stage 4 from stage 3
DEMO_STAGE3 ?= 0
# stage 3 for 208 steps, half its 6,640 pairs: at its learning rate it changes a few answers either
# way, and half gives the same validation figures in half the time (benchmarks/RESULTS.md, "The demo
# under 20 minutes")
DEMO_STEP3_STEPS ?= 208
ifeq ($(DEMO_STAGE3),1)
STAGE3 = $(SUBMAKE) demo-stage3
STEP4_FROM = step3
STEP3_ROW = --checkpoint step3=$(DEMO)/checkpoints/step3
else
STAGE3 =
STEP4_FROM = step2
STEP3_ROW =
endif
# the VLM reads 64-px tiles: renders of a 33^3 reconstruction grid look the same at that size as
# those of 48^3 or 64^3 and take less time, at the same validation accuracy of the chain and the dual
# path (benchmarks/RESULTS.md, "2026-11-23, 2-core CPU" and "Reconstruction at a lower cost")
DEMO_RENDER_RES ?= 33
SUBMAKE = $(MAKE) --no-print-directory
DEMO_JOBS ?= 2
# a job's threads: its share of the cores, at least one
JOB_THREADS := $(shell n=$$(nproc 2>/dev/null || echo 1); t=$$(( n / $(DEMO_JOBS) )); echo $$(( t > 0 ? t : 1 )))
JOB = OMP_NUM_THREADS=$(JOB_THREADS)
# the named targets, DEMO_JOBS at a time, each one's output printed whole when it ends
JOBS = $(SUBMAKE) -j$(DEMO_JOBS) --output-sync=target
# when make read this file, before it built .venv
MAKE_STARTED := $(shell date +%s)
# inference settings of every report line: the demo's longest reference answer is 10 tokens, so 16
# new tokens cut short only the rambling of checkpoints that never learnt a question (base and step1 on Q2-Q5)
ANSWER = --batch-size $(DEMO_BATCH) --max-new-tokens 16
# records a batch in inference, and views a batch wherever the demo renders reconstructions ahead of
# it: renders made in inference's batches are the files it would make itself (and the same on one
# thread as on two, which a batch of 8 is not: benchmarks/RESULTS.md, "Two jobs at a time")
DEMO_BATCH = 32
RENDER_AHEAD = $(PY) -m reconstruction.reconstruct --checkpoint $(DEMO)/recon/model --resolution $(DEMO_RENDER_RES) \
	--batch-size $(DEMO_BATCH) --no-progress
demo: $(VENV)/.installed
	rm -rf $(DEMO)/data $(DEMO)/data.partial $(DEMO)/models $(DEMO)/checkpoints $(DEMO)/report $(DEMO)/report_val \
		$(DEMO)/recon $(DEMO)/predictions $(DEMO)/stages $(DEMO)/fresh $(DEMO)/report_fresh
	@TIMEFORMAT="demo-data took %0R s"; time $(SUBMAKE) demo-data
	@TIMEFORMAT="demo-recon took %0R s"; time $(SUBMAKE) demo-recon
	@TIMEFORMAT="demo-stages took %0R s"; time $(SUBMAKE) demo-stages
	@TIMEFORMAT="demo-report took %0R s"; time $(SUBMAKE) demo-report
	@TIMEFORMAT="demo-alpha took %0R s"; time $(SUBMAKE) demo-alpha
	@echo "make demo took $$(( $$(date +%s) - $(MAKE_STARTED) )) s in all (building .venv included, where this run built it)"
	@echo
	@echo "dataset:        $(DEMO)/data  (manifest.jsonl, splits.json, dataset.json, scenes/)"
	@echo "contact sheet:  $(DEMO)/contact_sheet.png"
	@echo "stage files:    $(DEMO)/stages/  (each .jsonl with its InternVL .meta.json)"
	@echo "reconstruction: $(DEMO)/recon/  (model/, metrics.json, metrics_by_occlusion.png, contact_sheet.png)"
	@echo "checkpoints:    $(DEMO)/models/tiny (the shipped base), $(DEMO)/checkpoints/step1, step2, step4, step4_dual"
	@echo "                (step3 with DEMO_STAGE3=1)"
	@echo "                (each with training.png and train_log.jsonl: what its trainer logged, against the step)"
	@echo "reports:        $(DEMO)/report/ (test) and $(DEMO)/report_val/ (validation): report.md, report.json, plots"

demo-data:
	$(PY) -m data_tools.synthocc --out $(DEMO)/data --scenes $(DEMO_SCENES) --views $(DEMO_VIEWS) --size 128 --seed 0 \
		--extra-test-scenes $(DEMO_EXTRA_TEST_SCENES) --extra-val-scenes $(DEMO_EXTRA_VAL_SCENES)
	$(PY) -m data_tools.contact_sheet --data $(DEMO)/data --out $(DEMO)/contact_sheet.png
	# stages 1-2 fit three quarters of the training scenes; the rest are the chain's held-out views (occmllm.chain)
	$(PY) -m step1_sft.make_data --data $(DEMO)/data --out $(DEMO)/stages/step1_train.jsonl
	$(PY) -m step1_sft.make_data --data $(DEMO)/data --out $(DEMO)/stages/step1_val.jsonl --split val
	$(PY) -m step2_multiquery.make_data --data $(DEMO)/data --out $(DEMO)/stages/step2_train.jsonl
	$(PY) -m data_tools.make_testset --data $(DEMO)/data --out $(DEMO)/stages/heldout_q1.jsonl --split train \
		--part held-out --questions Q1
	$(PY) -m data_tools.make_testset --data $(DEMO)/data --out $(DEMO)/stages/val.jsonl --split val
	$(PY) -m data_tools.make_testset --data $(DEMO)/data --out $(DEMO)/stages/test.jsonl

# 3D reconstruction: the shipped pretrained model (or a fine-tune of it), evaluated against the true
# meshes on the whole test split at the grid the renders use (metrics.json, contact sheet); the
# evaluation also writes the test views' renders where the report's CoT and dual rows read them.
# Then renders of the chain's held-out training views: the renders stage 4 and the dual path train
# on are the ones inference makes
demo-recon:
	rm -rf $(DEMO)/recon/model && mkdir -p $(DEMO)/recon
	if [ $(DEMO_RECON_STEPS) -gt 0 ]; then $(PY) -m reconstruction.train --init_from $(RECON_BASE) --progress false \
		--log_steps 300 --steps $(DEMO_RECON_STEPS); else cp -r $(RECON_BASE) $(DEMO)/recon/model; fi
	$(JOBS) demo-recon-test demo-recon-heldout
demo-recon-test:
	$(JOB) $(PY) -m reconstruction.evaluate --checkpoint $(DEMO)/recon/model --data $(DEMO)/data --split test \
		--resolution $(DEMO_RENDER_RES) --out $(DEMO)/recon/metrics.json --sheet $(DEMO)/recon/contact_sheet.png \
		--renders $(DEMO)/report/renders --batch-size $(DEMO_BATCH) --no-progress
demo-recon-heldout:
	$(JOB) $(RENDER_AHEAD) --data $(DEMO)/data --records $(DEMO)/stages/heldout_q1.jsonl --out renders/recon

# the vision-language model: stages 1, 2 and 4 (with DEMO_STAGE3=1 also 3), each from the previous
# stage's checkpoint; the stage-2 model's answers to the held-out views label the chain's check (and
# stage 3's pairs)
demo-stages:
	rm -rf $(DEMO)/models/tiny && mkdir -p $(DEMO)/models && cp -r $(BASE) $(DEMO)/models/tiny
	PYTHON=$(PY) bash step1_sft/run.sh --disable_tqdm true
	PYTHON=$(PY) bash step2_multiquery/run.sh --disable_tqdm true --max_steps $(DEMO_STEP2_STEPS)
	$(PY) inference.py --checkpoint step2=$(DEMO)/checkpoints/step2 --data $(DEMO)/stages/heldout_q1.jsonl \
		--out $(DEMO)/predictions/step2_heldout $(ANSWER)
	$(STAGE3)
	$(PY) -m step4_selfconsistency.make_data --data $(DEMO)/data --out $(DEMO)/stages/step4_train.jsonl \
		--predictions $(DEMO)/predictions/step2_heldout/predictions.jsonl --renders renders/recon
	PYTHON=$(PY) bash step4_selfconsistency/run.sh --disable_tqdm true --model_name_or_path $(DEMO)/checkpoints/$(STEP4_FROM)
# stage 3 from the demo's stage 2 (after demo-stages has made stage 2 and its held-out answers)
demo-stage3:
	$(PY) -m step3_mpo.make_data --data $(DEMO)/data --out $(DEMO)/stages/step3_train.jsonl \
		--predictions $(DEMO)/predictions/step2_heldout/predictions.jsonl --replay
	PYTHON=$(PY) bash step3_mpo/run.sh --disable_tqdm true --max_steps $(DEMO_STEP3_STEPS)

# two reports, validation (report_val/, where settings are chosen) and test (report/): every
# checkpoint in plain mode, then stage 4's chain of thought. On validation the chain first looks
# again everywhere (row step4-always), and the gate is chosen on it and written into the stage-4
# checkpoint (python -m occmllm.chain gate: the best gate where it beats looking again everywhere or
# nowhere by more than chance, else that); the step4 cot rows use it (at gate 0 inference copies
# validation's from step4-always: the same checkpoint asked the same way). The two splits are two
# lines of jobs, each command writing one report folder; the validation views' renders are made
# ahead, beside the plain rows (the test views' came with the reconstruction's evaluation). Each
# command answers its checkpoints in turn, loading each once.
REPORT_CHECKPOINTS = --checkpoint base=$(DEMO)/models/tiny --checkpoint step1=$(DEMO)/checkpoints/step1 \
	--checkpoint step2=$(DEMO)/checkpoints/step2 $(STEP3_ROW) --checkpoint step4=$(DEMO)/checkpoints/step4
VAL = --data $(DEMO)/stages/val.jsonl --out $(DEMO)/report_val
TEST = --data $(DEMO)/stages/test.jsonl --out $(DEMO)/report
# the reconstruction model and grid of every mode that blends a render (cot, dual, TTA's second-look judge)
RENDERS = --recon $(DEMO)/recon/model --recon-resolution $(DEMO_RENDER_RES)
COT = --mode cot $(RENDERS) $(ANSWER)
demo-report:
	$(JOBS) demo-report-val demo-report-test
demo-report-val-renders:
	$(JOB) $(RENDER_AHEAD) --data $(DEMO)/data --records $(DEMO)/stages/val.jsonl --renders $(DEMO)/report_val/renders
demo-report-val-plain:
	$(JOB) $(PY) inference.py $(REPORT_CHECKPOINTS) $(VAL) $(ANSWER)
demo-report-val: demo-report-val-renders demo-report-val-plain
	$(JOB) $(PY) inference.py --checkpoint step4-always=$(DEMO)/checkpoints/step4 $(COT) --gate 0 $(VAL)
	$(PY) -m occmllm.chain gate --predictions $(DEMO)/report_val/predictions.jsonl --checkpoint step4-always \
		--data $(DEMO)/stages/val.jsonl --save $(DEMO)/checkpoints/step4
	$(JOB) $(PY) inference.py --checkpoint step4=$(DEMO)/checkpoints/step4 $(COT) $(VAL)
demo-report-test-plain:
	$(JOB) $(PY) inference.py $(REPORT_CHECKPOINTS) $(TEST) $(ANSWER)
# after the gate is chosen on validation
demo-report-test: demo-report-test-plain demo-report-val
	$(JOB) $(PY) inference.py --checkpoint step4=$(DEMO)/checkpoints/step4 $(COT) $(TEST)

# OCC-MLLM-Alpha on the final checkpoint: the dual visual path (a short fine-tune with a learnable
# alpha on the held-out views' Q1-Q5, so Q2-Q5 are kept, and their reconstruction renders; steps
# and alpha chosen on validation, benchmarks/RESULTS.md, "Why the VLM read less than its tower, and
# the aligned base" and "The demo under 20 minutes"), and test-time adaptation rewarded by the
# chain's second look over the image and its render (its learning rate, the default, chosen on
# validation). RLCF's own judge, a CLIP (`--tta clip`, occmllm.clip), gains nothing at the demo's
# size: an image-only tiny CLIP is wrong where the policy is (benchmarks/RESULTS.md, "A judge that
# sees the render"). Each split's two rows are a job of their own.
DEMO_DUAL_STEPS ?= 160
demo-alpha:
	$(PY) -m step2_multiquery.make_data --data $(DEMO)/data --out $(DEMO)/stages/dual_train.jsonl --part held-out
	PYTHON=$(PY) bash step1_sft/run.sh --model_name_or_path $(DEMO)/checkpoints/step4 \
		--train_data $(DEMO)/stages/dual_train.jsonl --dual_renders renders/recon \
		--output_dir $(DEMO)/checkpoints/step4_dual --dual_alpha 0.5 --dual_learnable true \
		--freeze_vision true --cache_vision true --max_steps $(DEMO_DUAL_STEPS) --warmup_steps 20 --learning_rate 0.0002 --disable_tqdm true
	$(JOBS) demo-alpha-val demo-alpha-test
# $* is the split: val or test
demo-alpha-val demo-alpha-test: demo-alpha-%:
	$(JOB) $(PY) inference.py --checkpoint step4-dual=$(DEMO)/checkpoints/step4_dual --mode dual $(RENDERS) \
		$(SPLIT_$*) $(ANSWER)
	$(JOB) $(PY) inference.py --checkpoint step4=$(DEMO)/checkpoints/step4 --tta second-look $(RENDERS) \
		$(SPLIT_$*) $(ANSWER)
SPLIT_val = $(VAL)
SPLIT_test = $(TEST)

# A third sample, to check a lead before keeping it (after make demo; about 5 minutes on 2 cores):
# the demo's checkpoints and modes on 1,920 views of seed 3, which no other dataset uses (the demo
# is seed 0, the base 1, the reconstruction model 2). Nothing is chosen on it: the chain runs at the
# gate stored from validation (benchmarks/RESULTS.md, "Evaluation splits of 1,280 views": a
# validation lead that reversed on these views)
FRESH_SCENES ?= 1000
FRESH = --data $(DEMO)/stages/fresh.jsonl --out $(DEMO)/report_fresh
demo-fresh:
	rm -rf $(DEMO)/fresh $(DEMO)/fresh.partial $(DEMO)/report_fresh
	$(PY) -m data_tools.synthocc --out $(DEMO)/fresh --scenes $(FRESH_SCENES) --views $(DEMO_VIEWS) --size 128 --seed 3 \
		--val-frac 0 --test-frac 0.96 --no-progress
	$(PY) -m data_tools.make_testset --data $(DEMO)/fresh --out $(DEMO)/stages/fresh.jsonl
	$(JOBS) demo-fresh-renders demo-fresh-plain
	# alone now, so on every core
	$(PY) inference.py --checkpoint step4=$(DEMO)/checkpoints/step4 $(COT) $(FRESH)
	$(PY) inference.py --checkpoint step4-dual=$(DEMO)/checkpoints/step4_dual --mode dual $(RENDERS) $(FRESH) $(ANSWER)
	$(PY) inference.py --checkpoint step4=$(DEMO)/checkpoints/step4 --tta second-look $(RENDERS) $(FRESH) $(ANSWER)
# the fresh views' renders made ahead, beside the plain rows
demo-fresh-renders:
	$(JOB) $(RENDER_AHEAD) --data $(DEMO)/fresh --records $(DEMO)/stages/fresh.jsonl --renders $(DEMO)/report_fresh/renders
demo-fresh-plain:
	$(JOB) $(PY) inference.py $(REPORT_CHECKPOINTS) $(FRESH) $(ANSWER)

# The demo's pretrained base (occmllm/pretrained/tiny-synthocc, shipped in the repository), in two
# steps as InternVL is built: a vision tower pretrained alone (through the model's own projector,
# which the base keeps: the VLM then reads what the tower learnt, BASE_HEAD=patches pretrains it
# with a throw-away head instead), then the projector and the language model aligned to it on
# captions with the tower frozen (benchmarks/RESULTS.md, "The tower pretrained through its
# projector"). Its scenes are of another seed than the demo's (a scene is drawn from its seed and
# index alone, so none is shared with the demo's splits).
# It sees each object without the hand (BASE_NO_HAND; set it empty to pretrain on the held views):
# InternVL was pretrained on objects as photographed, not held and hidden, and a base that already
# reads held objects leaves the recipe nothing to teach (benchmarks/RESULTS.md, "A base that never
# saw a hand").
# Its tower pretrains with random erasing (BASE_ERASE: that share of the images get a rectangle of
# noise over 2-40% of it, as DeiT pretrains): it learns to name objects with a part missing, never
# what hides it. On 24,000 scenes, stage 1 reads 0.779 of validation with a share of 0.8 (two
# training seeds), 0.766 with 0.5, 0.716 without erasing, and 0.684 from 6,000 scenes
# (benchmarks/RESULTS.md, "A base that learnt objects with parts missing" and "Stage 1 against its noise").
# The tiny model merges each image's 8 x 8 patches into one token (InternVL: 2 x 2): the tower is
# pretrained to be read patch by patch, and the two-layer language model reads it best that way
# (benchmarks/RESULTS.md, "Why the VLM read less than its tower, and the aligned base").
BASE := occmllm/pretrained/tiny-synthocc
BASE_SCENES ?= 24000
BASE_EPOCHS ?= 6
BASE_SEED ?= 1
BASE_HEAD ?= projector
BASE_NO_HAND ?= --no-hand
BASE_ERASE ?= 0.8
# the scenes depend on their seed and count alone: made once (about 15 minutes of the 37 at 24,000
# scenes) and kept for every rebuild with other settings; synthocc renames its folder into place only
# when complete, so an interrupted run leaves none to reuse
BASE_DATA := outputs/base-scenes/seed$(BASE_SEED)-$(BASE_SCENES)
base: $(VENV)/.installed
	# a fresh start, but for an interrupted pretraining's state (outputs/base/tower.partial): occmllm.pretrain
	# resumes from its last whole epoch where the settings are the same, and refuses other ones
	mkdir -p outputs/base && find outputs/base -mindepth 1 -maxdepth 1 ! -name tower.partial -exec rm -rf {} +
	test -d $(BASE_DATA) || $(PY) -m data_tools.synthocc --out $(BASE_DATA) --scenes $(BASE_SCENES) --views 2 \
		--size 128 --seed $(BASE_SEED) --val-frac 0.05 --test-frac 0 --no-progress
	$(PY) -m step1_sft.make_data --data $(BASE_DATA) --out outputs/base/train.jsonl --part all $(BASE_NO_HAND)
	# the validation views keep the hand: pretrain.json then says what the tower reads of held objects
	$(PY) -m step1_sft.make_data --data $(BASE_DATA) --out outputs/base/val.jsonl --split val
	$(PY) -m step1_sft.make_data --data $(BASE_DATA) --out outputs/base/captions.jsonl --part all --captions \
		$(BASE_NO_HAND)
	$(PY) -m occmllm.pretrain --train outputs/base/train.jsonl --val outputs/base/val.jsonl --out outputs/base/tower \
		--image-size 64 --merge 8 --head $(BASE_HEAD) --epochs $(BASE_EPOCHS) --erase $(BASE_ERASE) --no-progress
	PYTHON=$(PY) bash step1_sft/run.sh --model_name_or_path outputs/base/tower --train_data outputs/base/captions.jsonl \
		--output_dir outputs/base/aligned --num_train_epochs 2 --learning_rate 0.001 --save_strategy no \
		--freeze_vision true --cache_vision true --disable_tqdm true
	rm -rf $(BASE) && mkdir -p $(BASE) && cp outputs/base/tower/pretrain.json $(BASE)/ && \
		cp outputs/base/aligned/*.json outputs/base/aligned/*.jinja outputs/base/aligned/model.safetensors $(BASE)/

# The demo's pretrained reconstruction model (occmllm/pretrained/recon-synthocc, shipped), as MOHO
# pretrains on synthetic scenes before real ones: scenes of seed 2 (the base: seed 1, the demo:
# seed 0, so none is shared with the demo's splits), trained longer than a demo could
RECON_BASE := occmllm/pretrained/recon-synthocc
RECON_BASE_SCENES ?= 6400
# 12,000 steps reconstruct with 30% less Chamfer error but the second look gains nothing from it: the
# renders add no more to the image than these (benchmarks/RESULTS.md, "A better reconstruction does not...")
RECON_BASE_STEPS ?= 3000
recon-base: $(VENV)/.installed
	rm -rf outputs/recon-base
	$(PY) -m data_tools.synthocc --out outputs/recon-base/data --scenes $(RECON_BASE_SCENES) --views 2 --size 128 \
		--seed 2 --val-frac 0.05 --test-frac 0 --no-progress
	$(PY) -m reconstruction.train --data outputs/recon-base/data --output_dir outputs/recon-base/model \
		--steps $(RECON_BASE_STEPS) --progress false --log_steps 500
	rm -rf $(RECON_BASE) && mkdir -p $(RECON_BASE) && \
		cp outputs/recon-base/model/*.json* outputs/recon-base/model/model.safetensors $(RECON_BASE)/

# synthocc needs nothing; the others read the models and files `make demo` writes
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_synthocc.py
	$(PY) benchmarks/bench_recon.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_train.py

# The GPU figures benchmarks/RESULTS.md still lacks, most wanted first, in a few minutes: where a
# graphed inference batch's time goes, graphed decoding's first batch with its images made in the
# batch (no workers to start), its answers against plain's in float32, and the dynamic-tile runs
# grouped by length over a whole sorted group. BENCH_GPU_FLAGS adds flags to each (on a CPU,
# "--shape tiny --device cpu" tries the target in seconds)
BENCH_GPU_FLAGS ?=
bench-gpu-next:
	mkdir -p outputs/bench-gpu
	$(PY) benchmarks/bench_gpu.py --runs plain,plain-graphed --batch-size 32 --workers 8 --profile $(BENCH_GPU_FLAGS) \
		--json outputs/bench-gpu/inference_profiled.json
	$(PY) benchmarks/bench_gpu.py --runs plain-graphed,plain --batch-size 32 --workers 0 $(BENCH_GPU_FLAGS) \
		--json outputs/bench-gpu/inference_no_workers.json
	$(PY) benchmarks/bench_gpu.py --runs plain,plain-graphed --batch-size 32 --workers 8 --fp32 --steps 4 $(BENCH_GPU_FLAGS) \
		--json outputs/bench-gpu/inference_fp32.json
	$(PY) benchmarks/bench_gpu.py --tiles dynamic --runs full-compiled --batch-size 12 --workers 8 --group-by-length \
		--steps 50 $(BENCH_GPU_FLAGS) --json outputs/bench-gpu/train_dynamic_grouped_batch12.json
	$(PY) benchmarks/bench_gpu.py --tiles dynamic --runs full-compiled --batch-size 8 --workers 8 --group-by-length \
		--steps 50 $(BENCH_GPU_FLAGS) --json outputs/bench-gpu/train_dynamic_grouped.json

# The GPU figures of benchmarks/RESULTS.md in one go, on a CUDA machine (each run 3 warm-up and 10
# timed steps, or 11 batches): first bench-gpu-next's runs, then the stage trainers at 1 tile (batch
# 16 and 32) and with dynamic tiles (batch 8); the full fine-tune also with compiled layers, with
# dataloader workers and once without, to show the wait for data; at batch 16 and with dynamic tiles
# each run also profiles one step, to show where its time goes. Then inference at batch 32: plain
# with kept keys and values, whole prompts, the cot, dual and tta modes (both judges), compiled and
# graphed decoding, their images made ahead by 8 workers (each image stands in for its render: the
# renders' cost is bench_recon.py's to time). A JSON line each in outputs/bench-gpu/.
# bench_padding.py needs no GPU. With a CUDA environment of your own: make bench-gpu PY=python
bench-gpu: bench-gpu-next
	$(PY) benchmarks/bench_gpu.py --runs full,full-compiled,frozen,lora,mpo --workers 8 --profile \
		--json outputs/bench-gpu/train_1tile.json
	$(PY) benchmarks/bench_gpu.py --runs full,full-compiled --batch-size 32 --workers 8 \
		--json outputs/bench-gpu/train_1tile_batch32.json
	$(PY) benchmarks/bench_gpu.py --runs full --workers 0 --json outputs/bench-gpu/train_1tile_no_workers.json
	$(PY) benchmarks/bench_gpu.py --tiles dynamic --runs full,full-compiled,frozen --batch-size 8 --workers 8 \
		--profile --json outputs/bench-gpu/train_dynamic.json
	$(PY) benchmarks/bench_gpu.py --runs plain,plain-graphed,plain-whole,cot,dual,tta,tta-second-look,plain-compiled \
		--batch-size 32 --workers 8 --json outputs/bench-gpu/inference.json

clean-demo:
	rm -rf $(DEMO)
