"""benchmarks/bench_gpu.py in its tiny configuration on CPU: every run times, the FLOP count of a
batch matches a count made here from the model's shapes, and bad options are refused."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _bench(name: str = "bench_gpu"):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_configuration_times_every_run(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--shape", "tiny", "--device", "cpu", "--tiles",
                          "dynamic", "--steps", "2", "--warmup", "3", "--batch-size", "2", "--json",
                          str(tmp_path / "out.json"), "--runs",
                          "full,full-compiled,frozen,lora,mpo,plain,plain-compiled,plain-graphed,plain-whole,cot,dual,"
                          "tta,tta-second-look,frozen-all-logits"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())
    rows = {r["run"]: r for r in result["rows"]}
    assert list(rows) == ["full", "full-compiled", "frozen", "lora", "mpo", "plain", "plain-compiled", "plain-graphed",
                          "plain-whole", "cot", "dual", "tta", "tta-second-look", "frozen-all-logits"]
    assert result["peak_tflops"] > 0
    for run in ("full", "full-compiled", "frozen", "lora", "mpo", "frozen-all-logits"):
        r = rows[run]
        assert r["steps"] == 2 and r["samples_per_s"] > 0 and r["flops"] > 0
        # every step in one epoch: a new epoch starts the dataloader's workers anew, a wait the
        # benchmark would pay every few steps and a real stage once an epoch
        assert 0 < r["epochs"] <= 1
        assert r["tiles_per_sample"] > 1  # dynamic tiling: several tiles for most images
    # the same batches (same seed): training the tower costs more than freezing it, LoRA's frozen
    # language model less than training it; MPO stacks each pair's two answers and their images
    assert rows["full"]["flops"] > rows["frozen"]["flops"] > rows["lora"]["flops"]
    assert rows["mpo"]["tiles_per_sample"] == pytest.approx(2 * rows["frozen"]["tiles_per_sample"], rel=0.35)
    # the same work, counted the same way
    assert rows["frozen-all-logits"]["flops"] == rows["frozen"]["flops"]
    assert rows["full-compiled"]["flops"] == rows["full"]["flops"]
    for run in ("plain", "plain-compiled", "plain-graphed", "plain-whole", "cot", "dual", "tta", "tta-second-look"):
        r = rows[run]
        assert r["samples_per_s"] > 0 and r["first_batch_s"] > 0 and r["slowest_over_median"] >= 1
        # the first batch's wait for its images is part of its time, and also given apart
        assert 0 <= r["first_image_wait_s"] < r["first_batch_s"] and r["first_work_over_warm"] > 0
        assert 0 < r["image_prep_s"] and 0 < r["image_prep_share"] < 1
    # compiled and graphed decoding, and prompting every turn whole, answer alike
    assert rows["plain-compiled"]["same_answers_as_plain"] == rows["plain-whole"]["same_answers_as_plain"] == 1.0
    assert rows["plain-graphed"]["same_answers_as_plain"] == 1.0
    assert "TFLOP/s" in out.stdout and json.loads(out.stdout.strip().splitlines()[-1]) == result


def test_profile_tells_where_a_training_step_went(tmp_path):
    """--profile: each training run takes one more step under the profiler, not timed; its time
    splits into kinds of work that add up to the whole, matrix multiplies among them, and the
    operations that took most come largest first. An inference run profiles one more batch, and
    also names the host's Python functions that took most of its own time, and times one more
    batch part by part."""
    out = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--shape", "tiny", "--device", "cpu", "--steps",
                          "2", "--warmup", "1", "--batch-size", "2", "--runs", "frozen,plain", "--profile", "--json",
                          str(tmp_path / "out.json")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    frozen, plain = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert frozen["steps"] == 2
    batch = plain["profile"]
    assert batch["wall_ms"] > 0 and batch["kinds"]["matmul"] > 0 and sum(batch["kinds"].values()) == pytest.approx(1.0)
    host = [share for _, share in batch["host_top"]]
    assert 0 < len(host) <= 8 and host == sorted(host, reverse=True) and 0 < sum(host) <= 1
    assert "plain: one batch of" in out.stdout and "the host's own time" in out.stdout
    # one more batch part by part: the tower and the language model's passes took time, and the
    # parts (the rest on the host among them) add up to that batch's wall time
    parts = batch["parts_ms"]
    assert parts["vision tower and projector"] > 0 and parts["language model, eager passes"] > 0
    assert "language model, graph replays" not in parts  # plain decodes with generate
    assert sum(parts.values()) == pytest.approx(batch["serialised_ms"]) and min(parts.values()) >= 0
    assert "each part timed with the device synchronised" in out.stdout
    profile = frozen["profile"]
    assert profile["timed_by"] == "cpu" and profile["step_ms"] > 0
    assert sum(profile["kinds"].values()) == pytest.approx(1.0)
    assert profile["kinds"]["matmul"] > 0 and profile["kinds"]["optimizer"] > 0
    shares = [share for _, share in profile["top"]]
    assert 0 < len(shares) <= 8 and shares == sorted(shares, reverse=True)
    assert "frozen: one step," in out.stdout


def test_kinds_of_work_are_named_from_kernels_and_operators():
    kind = _bench().work_kind
    assert kind("aten::addmm") == kind("sm90_xmma_gemm_bf16bf16_bf16f32") == kind("nvjet_tst_128x256") == "matmul"
    assert kind("aten::_scaled_dot_product_flash_attention_for_cpu") == kind("flash_fwd_kernel") == "attention"
    assert kind("aten::_fused_adamw_") == kind("multi_tensor_apply_kernel") == "optimizer"
    assert kind("triton_poi_fused_add_mul_0") == "compiled"
    assert kind("aten::mul") == kind("void at::native::vectorized_elementwise_kernel<4>") == "elementwise"
    assert kind("aten::native_layer_norm") == "norm" and kind("aten::copy_") == "copy/cast"
    assert kind("aten::view") == "other"


def test_packed_batches_count_the_same_work_without_padding(tmp_path):
    """--packed: the same batches (same seed), each as one row; the same tokens and model FLOPs are
    counted (padding is not work), only the time differs. Batches made by a dataloader worker
    (--workers 1) bring the same counts to the main process, and the wait for data is timed; the
    same worker makes inference's images ahead."""
    results = []
    for runs, packed in (("frozen", []), ("frozen", ["--packed"]), ("frozen,plain", ["--workers", "1"])):
        out = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--shape", "tiny", "--device", "cpu",
                              "--tiles", "dynamic", "--steps", "2", "--warmup", "1", "--batch-size", "3", "--runs",
                              runs, "--json", str(tmp_path / "out.json"), *packed],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        results.append(json.loads((tmp_path / "out.json").read_text()))
    (padded,), (packed,), (workers, plain) = (r["rows"] for r in results)
    assert plain["run"] == "plain" and plain["samples_per_s"] > 0 and plain["steps"] == 2
    assert [r["packed"] for r in results] == [False, True, False]
    assert packed["tokens_per_sample"] == padded["tokens_per_sample"] and packed["flops"] == padded["flops"]
    assert packed["samples_per_s"] > 0
    assert workers["flops"] == padded["flops"] and workers["tiles_per_sample"] == padded["tiles_per_sample"]
    for row in (padded, workers):
        assert row["data_wait_s"] > 0 and row["samples_per_s_with_waits"] < row["samples_per_s"]


def test_flop_count_matches_the_shapes(tiny_model):
    """Forward FLOPs of one tile and one 40-token sequence, counted here from the config alone."""
    from transformers import InternVLForConditionalGeneration
    bench = _bench()
    model = InternVLForConditionalGeneration.from_pretrained(tiny_model)
    shape = bench.Shape(model)
    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    d, f = v.hidden_size, v.intermediate_size
    layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d + 2 * d  # q k v o (+ biases), mlp, 2 norms, 2 scales
    patches = (v.image_size[0] // v.patch_size[0]) ** 2
    vit_tokens = patches + 1
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert vision >= v.num_hidden_layers * layer  # the count covers every layer (plus embeddings)
    got = shape.forward_flops(1, [40])
    assert got["vision"] == 2 * vision * vit_tokens + 4 * v.num_hidden_layers * d * vit_tokens ** 2
    image_tokens = patches // 4  # 2 x 2 pixel shuffle
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert got["projector"] == 2 * projector * image_tokens
    text_params = sum(p.numel() for p in model.model.language_model.parameters()) - t.vocab_size * t.hidden_size
    assert got["text"] == 2 * (text_params + t.vocab_size * t.hidden_size) * 40 \
        + 4 * t.num_hidden_layers * t.hidden_size * 40 ** 2


def test_help_and_bad_options():
    out = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--shape" in out.stdout and "FLOPs" in out.stdout
    out = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--runs", "full,fast"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown run fast" in out.stderr


def test_make_bench_gpu_runs_what_it_says():
    """make bench-gpu's commands parse, time every stage trainer and every inference mode with
    image workers, plain inference once without them, and each trainer the same way."""
    import shlex
    bench = _bench()
    out = subprocess.run(["make", "-n", "bench-gpu", "PY=python"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line)[2:] for line in out.stdout.replace("\\\n", " ").splitlines()
             if "benchmarks/bench_gpu.py" in line]
    parsed = [bench.parse_args(argv) for argv in lines]
    timed = {(run, args.tiles, args.workers) for args, runs in parsed for run in runs}
    modes = set(bench.INFERENCE_RUNS)
    assert {run for run, _, workers in timed if run in modes and workers > 0} == modes
    assert ("plain", "1", 0) in timed
    for run in ("full", "frozen", "lora", "mpo"):
        assert (run, "1", 8) in timed
    assert {("full", "dynamic", 8), ("frozen", "dynamic", 8), ("full", "1", 0)} <= timed


def test_padding_share_counts_padded_slots():
    share = _bench("bench_padding").padding_share
    # batches [0, 1] and [2]: slots 2 x 5 + 1 x 2 = 12, tokens 3 + 5 + 2 = 10
    assert share([3, 5, 2], [0, 1, 2], 2) == pytest.approx(1 - 10 / 12)
    assert share([4, 4, 4], [2, 0, 1], 2) == 0


def test_grouped_batches_pad_less_than_random_ones(capsys):
    """bench_padding.py on the tiny shape's dynamic tiles: batches grouped by length carry less
    padding than any random epoch; a bad option is refused (exit 2)."""
    bench = _bench("bench_padding")
    result = bench.main(["--shape", "tiny", "--samples", "96", "--batch-sizes", "4", "--draws", "2"])
    row, = result["rows"]
    assert result["samples"] == 96 and result["max_tokens"] > result["mean_tokens"]
    assert 0 <= max(row["grouped"]) < min(row["random"]) < 1
    assert "grouped by length" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        bench.main(["--batch-sizes", "0"])
    assert refused.value.code == 2


def test_grouped_runs_draw_from_a_real_sized_stage1_file(tmp_path):
    """--group-by-length: the stage-1 file repeats its views (each copy its own id) up to the
    samples asked, so transformers' sampler sorts whole groups of 50 batches, not groups of 3;
    the other files keep one record per view."""
    from occmllm.records import read_records
    files = _bench().build_data(tmp_path, 32, "dynamic", 8, stage1_samples=30)
    stage1 = read_records(files["step1"])
    assert len(stage1) == 32 and len({r["id"] for r in stage1}) == 32  # 4 copies of 8 views
    assert [r["image"] for r in stage1[8:16]] == [r["image"] for r in stage1[:8]]
    assert len(read_records(files["test"], "test")) == 8
