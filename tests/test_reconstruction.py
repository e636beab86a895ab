"""The reconstruction model, its supervision, the reconstruct / evaluate commands and their errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from occmllm.dataset import load_dataset
from occmllm.errors import OccError
from reconstruction import evaluate as evaluate_cmd
from reconstruction import reconstruct as reconstruct_cmd
from reconstruction.model import ReconConfig, SDFReconstructor, load_reconstructor, view_batch
from reconstruction.reconstruct import Reconstructor
from reconstruction.supervision import TrainingViews, silhouette_rays
from reconstruction.train import ReconTrainArguments, train
from reconstruction.views import CUBE_HALF, cube_centre, load_view

from conftest import SMALL_RECON as SMALL, losses_before_and_after  # noqa: E402


@pytest.fixture(scope="module")
def views(synth) -> TrainingViews:
    return TrainingViews(load_dataset(synth), "train")


@pytest.fixture(scope="module")
def trained(recon_model) -> Path:
    return recon_model


def test_bank_sdf_sign_matches_the_mesh_and_colours_come_from_the_object(views):
    scene = views.views[0]["scene"]
    bank = views.bank(scene)
    mesh = trimesh.load(views.root / views.views[0]["mesh"], process=False)
    far = np.abs(bank.sdf) > 0.003  # away from the surface, where the mesh's facets cannot disagree
    inside = mesh.contains(bank.points[far][:400])
    assert np.array_equal(inside, bank.sdf[far][:400] < 0)
    assert len(bank.surface) > 100 and (bank.colour >= 0).all() and (bank.colour <= 1).all()


def test_silhouette_rays_ignore_hand_pixels_and_stay_in_the_cube(views):
    rng = np.random.default_rng(0)
    scene = views.scenes[views.views[0]["scene"]]
    target, other = views.view(scene[0]), views.view(scene[1])
    centre = cube_centre(target)
    points, silhouette, weight = silhouette_rays(target, other, centre, 256, 8, rng)
    assert points.shape == (256, 8, 3) and silhouette.shape == weight.shape == (256,)
    hit = weight > 0
    assert np.all(np.abs(points[hit] - centre) <= CUBE_HALF + 1e-4)
    # re-draw the same pixels to check the weights: zero exactly where the other view's hand is
    rng = np.random.default_rng(0)
    h, w = other.size
    region = other.visible | other.hand
    ys, xs = np.nonzero(region)
    y0, y1 = max(ys.min() - 8, 0), min(ys.max() + 8, h - 1)
    x0, x1 = max(xs.min() - 8, 0), min(xs.max() + 8, w - 1)
    py = np.concatenate([rng.integers(y0, y1 + 1, 128), rng.integers(0, h, 128)])
    px = np.concatenate([rng.integers(x0, x1 + 1, 128), rng.integers(0, w, 128)])
    on_hand = other.hand[py, px]
    assert on_hand.any() and (weight[on_hand] == 0).all()
    assert np.array_equal(silhouette, other.visible[py, px].astype(np.float32))


def test_model_shapes_and_save_load_round_trip(views, tmp_path):
    torch.manual_seed(0)
    model = SDFReconstructor(ReconConfig(**SMALL)).eval()
    batch = view_batch([views.view(v) for v in views.views[:2]])
    points = batch["centre"][:, None] + torch.randn(2, 50, 3) * 0.05
    with torch.no_grad():
        sdf, colour = model.query(model.encode(batch), points)
    assert sdf.shape == (2, 50) and colour.shape == (2, 50, 3)
    model.save(tmp_path / "m")
    again = load_reconstructor(tmp_path / "m")
    with torch.no_grad():
        sdf2, colour2 = again.query(again.encode(batch), points)
    assert torch.equal(sdf, sdf2) and torch.equal(colour, colour2)


@pytest.mark.parametrize("layers", [1, 2, 4])  # the skip connection at layer 0 (read twice), 1 and 2
def test_the_sdf_only_path_equals_query(views, layers):
    """Mesh extraction's ``sdf`` (no colour head, the global feature as a per-view bias, the skip
    connection as a second product) computes ``query``'s signed distance in another order."""
    torch.manual_seed(layers)
    model = SDFReconstructor(ReconConfig(**{**SMALL, "layers": layers})).eval()
    for layer in model.layers:  # weights large enough that a wrongly placed column would show
        torch.nn.init.normal_(layer.weight, std=0.3)
    batch = view_batch([views.view(v) for v in views.views[:2]])
    points = batch["centre"][:, None] + torch.randn(2, 300, 3) * 0.05
    with torch.no_grad():
        enc = model.encode(batch)
        expected, fast = model.query(enc, points)[0], model.sdf(enc, points)
    assert fast.shape == (2, 300) and expected.std() > 1e-3
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)


def test_a_few_steps_lower_every_loss_on_a_fixed_batch(views):
    first, last = losses_before_and_after(views, 40)
    print(first, last)
    for key in ("sdf", "silhouette", "colour", "total"):
        assert last[key] < first[key], key


def test_training_writes_a_loadable_model(trained):
    assert (trained / "config.json").is_file() and (trained / "model.safetensors").is_file()
    log = [json.loads(x) for x in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [3, 6]
    assert (trained / "training.png").is_file()
    assert not trained.with_name(trained.name + ".partial").exists()
    load_reconstructor(trained)


def test_interrupted_training_resumes_to_the_uninterrupted_model(synth, tmp_path, monkeypatch):
    """Stopped right after its resumable state at step 2 of 4, then started again: the same weights
    (exactly: CPU fp32, the same arithmetic) and the same log as a run never stopped."""
    from safetensors.torch import load_file

    from reconstruction import train as train_module

    def args(out):
        return ReconTrainArguments(data=str(synth), output_dir=str(out), steps=4, batch_size=1, sdf_points=64,
                                   eikonal_points=8, colour_points=16, silhouette_rays=8, ray_samples=4, save_steps=2,
                                   log_steps=1, progress=False)
    train(args(tmp_path / "full"), ReconConfig(**SMALL))
    real = train_module._save_last

    def save_then_stop(folder, *rest):
        real(folder, *rest)
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "_save_last", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(args(tmp_path / "resumed"), ReconConfig(**SMALL))
    assert (tmp_path / "resumed.partial/trainer_state.pt").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(train_module, "_save_last", real)
    train(args(tmp_path / "resumed"), ReconConfig(**SMALL))
    assert not (tmp_path / "resumed.partial").exists()
    full, resumed = (load_file(tmp_path / f"{name}/model.safetensors") for name in ("full", "resumed"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)

    def log(name):  # wall time and memory differ between runs; every loss must not
        return [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "max_rss_mb")}
                for x in (tmp_path / f"{name}/train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log("full")] == [1, 2, 3, 4] and log("resumed") == log("full")


def test_interrupted_reconstruction_renders_resume_to_the_same_images(trained, synth, monkeypatch):
    """Stopped in its second batch of views, started again: the same images as a run never stopped
    (equal here; the check allows 1 grey level, since the resumed run batches other views together
    and a BLAS may sum a batch of another size in another order)."""
    from PIL import Image
    argv = ["--checkpoint", str(trained), "--data", str(synth), "--split", "test", "--resolution", "24",
            "--batch-size", "2", "--no-progress"]
    assert reconstruct_cmd.main([*argv, "--out", "renders/recon_full"]) == 0
    real, calls = reconstruct_cmd.render, []

    def stop_in_the_second_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(reconstruct_cmd, "render", stop_in_the_second_batch)
    with pytest.raises(SystemExit) as exc:
        reconstruct_cmd.main([*argv, "--out", "renders/recon_resumed"])
    assert exc.value.code == 130 and len(list((synth / "renders/recon_resumed").iterdir())) == 2
    monkeypatch.undo()
    assert reconstruct_cmd.main([*argv, "--out", "renders/recon_resumed"]) == 0
    full = sorted((synth / "renders/recon_full").iterdir())
    assert [p.name for p in full] == sorted(p.name for p in (synth / "renders/recon_resumed").iterdir())
    for path in full:
        a = np.asarray(Image.open(path), dtype=int)
        b = np.asarray(Image.open(synth / "renders/recon_resumed" / path.name), dtype=int)
        assert np.abs(a - b).max() <= 1, path.name


def test_reconstruct_writes_one_render_per_view_and_resumes(trained, synth, capsys):
    argv = ["--checkpoint", str(trained), "--data", str(synth), "--split", "test", "--out", "renders/t",
            "--resolution", "24", "--no-progress"]
    assert reconstruct_cmd.main(argv) == 0
    test_ids = [v["id"] for v in load_dataset(synth).split("test")]
    written = sorted(p.stem for p in (synth / "renders/t").glob("*.png"))
    assert written == sorted(test_ids)
    assert reconstruct_cmd.main(argv) == 0
    assert f"({len(test_ids)} already there" in capsys.readouterr().out


def test_renders_made_ahead_are_the_files_inference_makes(trained, synth, tmp_path):
    """``reconstruct --renders DIR`` over a test file, in inference's batches, writes the files that
    inference's own ``RenderCache`` writes batch by batch: the demo makes a split's renders ahead,
    beside another job, and its chain reads them as if it had made them."""
    from reconstruction.reconstruct import RenderCache
    ids = [v["id"] for v in load_dataset(synth).split("test")][::-1]  # the file's order, not the manifest's
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    assert reconstruct_cmd.main(["--checkpoint", str(trained), "--data", str(synth), "--records", str(test_file),
                                 "--renders", str(tmp_path / "ahead"), "--batch-size", "3", "--resolution", "24",
                                 "--no-progress"]) == 0
    cache = RenderCache(trained, synth, tmp_path / "inference", 24, "cpu")
    for start in range(0, len(ids), 3):
        cache.paths(ids[start: start + 3])
    made = sorted(p.name for p in (tmp_path / "inference").iterdir())
    assert len(ids) > 3 and made == sorted(f"{i}.png" for i in ids)
    assert sorted(p.name for p in (tmp_path / "ahead").iterdir()) == made
    for name in made:
        assert (tmp_path / "ahead" / name).read_bytes() == (tmp_path / "inference" / name).read_bytes(), name


def test_an_empty_reconstruction_renders_blank_and_the_batch_goes_on(trained, synth, tmp_path, capsys):
    model = load_reconstructor(trained)
    with torch.no_grad():
        model.sdf_head.weight.zero_()
        model.sdf_head.bias.fill_(1.0)  # SDF positive everywhere: no surface
    model.save(tmp_path / "never")
    argv = ["--checkpoint", str(tmp_path / "never"), "--data", str(synth), "--out", "renders/never",
            "--resolution", "16", "--no-progress"]
    assert reconstruct_cmd.main(argv) == 0
    captured = capsys.readouterr()
    assert "empty reconstructions" in captured.out and "the reconstruction is empty" in captured.err
    from PIL import Image
    images = [np.asarray(Image.open(p)) for p in (synth / "renders/never").glob("*.png")]
    assert images and all((im == im.flat[0]).all() for im in images)


def test_evaluate_writes_metrics_with_baseline_and_bins(trained, synth, tmp_path):
    out = tmp_path / "metrics.json"
    assert evaluate_cmd.main(["--checkpoint", str(trained), "--data", str(synth), "--out", str(out),
                              "--sheet", str(tmp_path / "sheet.png"), "--resolution", "24", "--no-progress",
                              "--renders", str(tmp_path / "renders")]) == 0
    m = json.loads(out.read_text())
    for key in ("chamfer", "fscore_5mm", "fscore_10mm", "silhouette_iou", "by_occlusion", "baseline", "samples"):
        assert key in m
    assert m["n"] == len(m["samples"]) == sum(b["n"] for b in m["by_occlusion"])
    assert 0 <= m["baseline"]["fscore_10mm"] <= 1 and m["baseline"]["n"] == m["n"]
    assert (tmp_path / "sheet.png").stat().st_size > 0
    from matplotlib.image import imread
    assert imread(tmp_path / "metrics_by_occlusion.png").shape[1] > 0  # the metrics against occlusion, beside them
    # --renders: the images reconstruct writes, for every view it scored (inference then finds them made)
    from PIL import Image
    assert reconstruct_cmd.main(["--checkpoint", str(trained), "--data", str(synth), "--split", "test", "--out",
                                 "renders/by_reconstruct", "--resolution", "24", "--no-progress"]) == 0
    written = sorted((tmp_path / "renders").glob("*.png"))
    assert [p.stem for p in written] == sorted(str(r["id"]) for r in m["samples"])
    for path in written:
        again = synth / "renders/by_reconstruct" / path.name
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again))), path.name


def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_metrics(trained, synth, tmp_path, monkeypatch,
                                                                        capsys):
    """Stopped in its second batch, evaluate keeps the first batch's scores in metrics.json.partial/;
    started again it scores only the batches left (and a scored one again if the contact sheet shows
    one of its views), drops the unfinished line a kill mid-write leaves, and ends with the
    uninterrupted run's metrics.json and sheet, byte for byte. A restart with other settings is
    refused in one line."""
    def run(folder: str, *extra: str) -> int:
        return evaluate_cmd.main(["--checkpoint", str(trained), "--data", str(synth), "--split", "train", "--limit",
                                  "20", "--resolution", "16", "--no-progress", "--out", str(tmp_path / folder /
                                  "metrics.json"), "--sheet", str(tmp_path / folder / "sheet.png"), *extra])

    assert run("whole") == 0
    assert not (tmp_path / "whole/metrics.json.partial").exists()
    real, batches, stop = Reconstructor.__call__, [], [True]

    def stops_in_the_second_batch(self, views):
        batches.append(len(views))
        if stop[0] and len(batches) == 2:
            raise KeyboardInterrupt
        return real(self, views)

    monkeypatch.setattr(Reconstructor, "__call__", stops_in_the_second_batch)
    with pytest.raises(SystemExit) as stopped:
        run("cut")
    assert stopped.value.code == 130  # the command's exit on Ctrl-C
    partial = tmp_path / "cut/metrics.json.partial"
    assert not (tmp_path / "cut/metrics.json").exists()
    assert len((partial / "views.jsonl").read_text().splitlines()) == 8
    with open(partial / "views.jsonl", "a") as fh:
        fh.write('{"id": "half-writ')  # what a kill in the middle of a write leaves
    with pytest.raises(SystemExit) as refused:
        run("cut", "--resolution", "24")
    assert refused.value.code == 2 and "other settings (resolution)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # another batch would change the meshes in the last bits
        run("cut", "--batch-size", "4")
    assert refused.value.code == 2 and "other settings (batch_size)" in capsys.readouterr().err
    batches.clear()
    stop[0] = False
    assert run("cut") == 0
    lines = load_dataset(synth).split("train")[:20]
    on_sheet = {i for row in evaluate_cmd.sheet_picks([line["occlusion"] for line in lines]) for i in row}
    # the batches left, and the first again if it holds a view of the sheet
    assert batches == [8] * bool(on_sheet & set(range(8))) + [8, 4]
    assert (tmp_path / "cut/metrics.json").read_bytes() == (tmp_path / "whole/metrics.json").read_bytes()
    assert (tmp_path / "cut/sheet.png").read_bytes() == (tmp_path / "whole/sheet.png").read_bytes()
    assert not partial.exists()


def test_sheet_picks_spread_each_occlusion_bin():
    """One row per occlusion bin, up to four views spread over the bin in order (first and last
    included), views without an occlusion ratio left out, a fully occluded view in the last bin."""
    from reconstruction.evaluate import sheet_picks
    occlusions = [0.0, 0.05, 0.1, 0.15, 0.25, 0.3, 0.5, None, 0.3, 1.0, 0.9]
    assert sheet_picks(occlusions) == [[0, 1, 2, 3], [4, 5, 8], [6], [], [9, 10]]
    assert sheet_picks([0.1] * 7, per_row=3) == [[0, 3, 6], [], [], [], []]


def test_bad_inputs_are_clear_errors(synth, tmp_path, trained):
    with pytest.raises(OccError, match="not found"):
        Reconstructor(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "other/model.safetensors").write_text("")
    with pytest.raises(OccError, match="not a reconstruction model"):
        Reconstructor(tmp_path / "other")
    line = dict(load_dataset(synth).views[0])
    del line["mask_hand"]
    with pytest.raises(OccError, match="mask_hand"):
        load_view(synth, line, 10000.0)
    with pytest.raises(SystemExit) as exc:
        reconstruct_cmd.main(["--checkpoint", str(tmp_path / "missing"), "--data", str(synth)])
    assert exc.value.code == 2


SHIPPED = Path(__file__).resolve().parents[1] / "occmllm/pretrained/recon-synthocc"


@pytest.fixture(scope="module")
def fresh_scenes(tmp_path_factory) -> TrainingViews:
    """12 scenes x 2 views at the demo's 128 px, from a seed neither the shipped model nor the demo uses."""
    from data_tools.synthocc import Settings, generate
    out = generate(tmp_path_factory.mktemp("fresh") / "data",
                   Settings(scenes=12, views=2, seed=5, size=128, focal=280.0 * 128 / 224, val_frac=0, test_frac=0),
                   workers=1, progress=False)
    return TrainingViews(load_dataset(out), "train")


def _losses_on(model, views: TrainingViews) -> dict:
    from reconstruction.train import collate, losses
    args = ReconTrainArguments()
    rng = np.random.default_rng(0)
    batch = collate([views.item(i, rng, 1024, 256, 64, 16) for i in range(len(views))], "cpu")
    with torch.no_grad():
        return {k: float(v) for k, v in losses(model.eval(), batch, args).items()}


def test_shipped_reconstruction_model_beats_a_fresh_one_on_unseen_scenes(fresh_scenes):
    shipped = load_reconstructor(SHIPPED)
    torch.manual_seed(0)
    fresh = SDFReconstructor(shipped.cfg)
    ours, theirs = _losses_on(shipped, fresh_scenes), _losses_on(fresh, fresh_scenes)
    print(f"24 unseen views: SDF L1 {ours['sdf']:.3f} cm against {theirs['sdf']:.3f} from scratch; "
          f"silhouette {ours['silhouette']:.3f} against {theirs['silhouette']:.3f}")
    assert ours["sdf"] < 0.5 * theirs["sdf"] and ours["silhouette"] < theirs["silhouette"]  # 0.48 / 2.12 cm
    log = [json.loads(x) for x in (SHIPPED / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["sdf"] < log[0]["sdf"]


def test_training_from_the_shipped_model_starts_where_it_ends(fresh_scenes, tmp_path):
    """--init_from: the shipped weights and architecture are the start; at a vanishing learning
    rate one step leaves the weights as they were (batch norm's running statistics do move)."""
    out = tmp_path / "tuned"
    args = ReconTrainArguments(data=str(fresh_scenes.dataset.folder), output_dir=str(out), init_from=str(SHIPPED),
                               steps=1, batch_size=2, learning_rate=1e-12, sdf_points=64, eikonal_points=8,
                               colour_points=16, silhouette_rays=8, ray_samples=4, progress=False)
    train(args, ReconConfig(**SMALL))  # the architecture flags give way to the shipped model's
    tuned, shipped = load_reconstructor(out), load_reconstructor(SHIPPED)
    assert tuned.cfg == shipped.cfg
    for (name, a), (_, b) in zip(tuned.named_parameters(), shipped.named_parameters()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
