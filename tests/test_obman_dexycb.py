"""The ObMan converter on a small root in ObMan's own layout and encodings (``realdata_fixtures``):
masks, depth, camera and object models against what the fixture encoded; reconstruction and
inference on the converted data; bad inputs. DexYCB's converters: ``test_dexycb.py``."""
import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

from data_tools import obman
from occmllm.dataset import load_dataset, resolve_in_roots
from occmllm.errors import OccError
from occmllm.questions import CATEGORY_ATTRIBUTES
from realdata_fixtures import OBMAN_SIZE, make_obman_root, manifest, read_png

pytestmark = pytest.mark.usefixtures("one_thread")

BOTTLE = "02876657"
DEPTH_SCALE = 10000.0


@pytest.fixture
def obman_fixture(tmp_path):
    return make_obman_root(tmp_path)


@pytest.fixture
def obman_root(obman_fixture):
    return obman_fixture[0]


@pytest.fixture(scope="module")
def obman_converted(tmp_path_factory):
    """The ObMan fixture converted once with its ShapeNet models: (dataset folder, truth, shapenet)."""
    base = tmp_path_factory.mktemp("obman")
    root, shapenet, truth = make_obman_root(base)
    obman.convert(root, base / "out", shapenet_root=shapenet, progress=False)
    return base / "out", truth, shapenet


# --- ObMan: what the conversion writes -----------------------------------------------------------

def test_obman_masks_depth_camera_and_model_are_what_the_fixture_encoded(obman_converted):
    out, truth, shapenet = obman_converted
    lines = manifest(out)
    assert [r["id"] for r in lines] == list(truth)
    info = json.loads((out / "dataset.json").read_text())
    assert info["depth_scale"] == DEPTH_SCALE and info["model_roots"] == {"shapenet": str(shapenet.resolve())}
    ds = load_dataset(out)
    for line in lines:
        enc = truth[line["id"]]
        split, stem = line["id"].split("_")[1:]
        assert line["image"] == f"{split}/rgb/{stem}.jpg" and line["mask"] == f"{split}/segm/{stem}.png"
        for kind, mask in (("mask_visible", enc.visible), ("mask_hand", enc.hand), ("mask_amodal", enc.amodal)):
            assert line[kind] == f"views/{split}/{kind}/{stem}.png"
            assert np.array_equal(read_png(out, line[kind]) > 127, mask), (line["id"], kind)
        depth = read_png(out, line["depth"]).astype(np.float64) / DEPTH_SCALE
        hit = enc.depth > 0
        # camera z at every pixel within half an 8-bit step of ObMan's encoding (plus the 0.1 mm of ours)
        assert np.abs(depth[hit] - enc.depth[hit]).max() <= enc.quantum / 2 + 1e-4 and (depth[~hit] == 0).all()
        assert ("depth_object" in line) == ("rgb_nohand" in line) == (line["id"] == "obman_train_00000000")
        if "depth_object" in line:
            obj = read_png(out, line["depth_object"]).astype(np.float64) / DEPTH_SCALE
            assert np.abs(obj[enc.depth_object > 0] - enc.depth_object[enc.depth_object > 0]).max() < 1e-3
        scale = OBMAN_SIZE / 256  # ObMan's fixed camera, for a 64-px copy
        assert np.allclose(line["intrinsics"], [[480 * scale, 0, 128 * scale], [0, 480 * scale, 128 * scale], [0, 0, 1]])
        assert np.allclose(line["world_to_cam"], np.diag([1.0, -1.0, -1.0, 1.0]))
        assert line["occlusion"] == pytest.approx(1 - enc.visible.sum() / enc.amodal.sum(), abs=1e-6)
        assert line["attributes"] == CATEGORY_ATTRIBUTES[line["category"]]
        model = line["object_model"]
        assert model["root"] == "shapenet" and model["path"].endswith("/models/model_normalized.obj")
        assert np.allclose(model["to_world"], enc.to_world, atol=1e-6)
        # independent geometry: the visible pixels, back-projected with the written depth and
        # camera, lie on the ShapeNet model placed by to_world
        mesh = trimesh.load(shapenet / model["path"], process=False)
        mesh.apply_transform(np.asarray(model["to_world"]))
        v, u = np.nonzero(enc.visible)
        z = depth[v, u]
        cam = np.stack([(u + 0.5) * z, (v + 0.5) * z, z], 1) @ np.linalg.inv(np.asarray(line["intrinsics"])).T
        w2c = np.asarray(line["world_to_cam"])
        world = (cam - w2c[:3, 3]) @ w2c[:3, :3]
        surface, _ = trimesh.sample.sample_surface(mesh, 20000, seed=0)
        assert cKDTree(surface).query(world)[0].max() < 0.003, line["id"]
        assert resolve_in_roots(ds.roots, line["mask_hand"], line["id"]).is_relative_to(out.resolve())
        assert resolve_in_roots(ds.roots, line["image"], line["id"]).is_relative_to(ds.root.resolve())


def test_obman_rerun_keeps_complete_files_and_rewrites_damaged_ones(obman_fixture, tmp_path):
    root, shapenet, _ = obman_fixture
    out = tmp_path / "out"
    obman.convert(root, out, ["train"], shapenet_root=shapenet, progress=False)
    manifest = (out / "manifest.jsonl").read_text()
    files = sorted((out / "views").rglob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    damaged = out / "views/train/depth/00000001.png"
    damaged.write_bytes(damaged.read_bytes()[:40])  # damaged after the run: rewritten, not trusted
    obman.convert(root, out, ["train"], shapenet_root=shapenet, progress=False)
    assert (out / "manifest.jsonl").read_text() == manifest
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files if p != damaged)
    assert np.asarray(Image.open(damaged)).shape == (OBMAN_SIZE, OBMAN_SIZE)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary file left


def test_obman_meta_camera_is_used_when_present(obman_root, tmp_path):
    meta_file = obman_root / "test/meta/00000000.pkl"
    meta = obman.load_meta(meta_file)
    meta["cam_intr"] = np.array([[100, 0, 30], [0, 100, 34], [0, 0, 1]], np.float32)
    meta["cam_extr"] = np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 0.5]], np.float32)
    meta_file.write_bytes(pickle.dumps(meta))
    obman.convert(obman_root, tmp_path / "out", ["test"], progress=False)
    line = manifest(tmp_path / "out")[0]
    assert line["intrinsics"][0] == [100.0, 0.0, 30.0] and line["world_to_cam"][2] == [0.0, 0.0, -1.0, 0.5]
    assert line["world_to_cam"][3] == [0, 0, 0, 1]
    info = json.loads((tmp_path / "out/dataset.json").read_text())
    assert info["model_roots"] == {"shapenet": None}  # no --shapenet-root given


@pytest.mark.parametrize("folder, what", [("depth", "depth maps"), ("segm", "segmentation")])
def test_obman_without_depth_or_segm_is_one_line_and_nothing_written(obman_root, tmp_path, capsys, folder, what):
    shutil.rmtree(obman_root / "test" / folder)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        obman.main(["--root", str(obman_root), "--out", str(out), "--splits", "train,test", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: {obman_root / 'test' / folder}: no such folder") and what in err
    assert not out.exists()


# --- ObMan: meta pickles, and files that are missing or damaged -------------------------------------

def write_meta(path, meta, protocol=pickle.DEFAULT_PROTOCOL):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(meta, protocol=protocol))


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as ObMan-era Python 2 pickles hold numpy buffers."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    import io
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.", b"numpy.core.")  # numpy 1.x module names


def test_obman_limit_and_python2_pickle(obman_root, tmp_path):
    meta_file = obman_root / "val/meta/00000000.pkl"
    meta = obman.load_meta(meta_file)
    meta_file.write_bytes(py2_pickle(meta))
    loaded = obman.load_meta(meta_file)
    assert np.array_equal(loaded["coords_3d"], meta["coords_3d"]) and loaded["depth_min"] == meta["depth_min"]
    info = obman.convert(obman_root, tmp_path / "out", ["train", "val", "test"], limit=1, progress=False)
    assert info["splits"] == {"train": 1, "val": 1, "test": 1}


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload, refused", [
    (lambda marker: _Evil(os.system, f"touch {marker}"), "system"),
    (lambda marker: _Evil(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
    (lambda marker: _Evil(getattr, _Evil(__import__, "os"), "system"), "builtins.getattr"),
])
def test_obman_malicious_pickle_refused_and_nothing_written(obman_root, tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    write_meta(obman_root / "train" / "meta" / "00000000.pkl", {"class_id": BOTTLE, "x": payload(marker)})
    out = tmp_path / "out"
    with pytest.raises(OccError) as err:
        obman.convert(obman_root, out, ["train", "test"], progress=False)
    msg = str(err.value)
    assert "refuses to load pickle global" in msg and refused in msg
    assert str(obman_root / "train" / "meta" / "00000000.pkl") in msg
    assert not marker.exists()
    assert not out.exists()


def test_obman_bad_file_later_keeps_earlier_views_but_writes_nomanifest(obman_root, tmp_path):
    write_meta(obman_root / "train" / "meta" / "00000002.pkl", _Evil(os.system, "true"))
    out = tmp_path / "out"
    with pytest.raises(OccError, match=r"00000002\.pkl: refuses to load pickle global"):
        obman.convert(obman_root, out, ["train"], progress=False)
    assert not (out / "manifest.jsonl").exists() and not (out / "dataset.json").exists()
    assert (out / "views/train/depth/00000001.png").is_file()  # complete files of earlier views: a rerun resumes


def test_obman_malicious_pickle_cli_one_line_error(obman_root, tmp_path, capsys):
    write_meta(obman_root / "test" / "meta" / "00000000.pkl", _Evil(os.system, "true"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as exit_:
        obman.main(["--root", str(obman_root), "--out", str(out), "--splits", "test", "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "system" in err and "\n" not in err
    assert list(out.iterdir()) == []


def test_obman_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        obman.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--splits" in out and "--shapenet-root" in out


def test_obman_unknown_class_id(obman_root, tmp_path):
    meta = obman.load_meta(obman_root / "train/meta/00000002.pkl")
    write_meta(obman_root / "train/meta/00000002.pkl", {**meta, "class_id": "02691156"})  # airplane
    with pytest.raises(OccError, match=r"00000002\.pkl: unknown class_id '02691156'"):
        obman.convert(obman_root, tmp_path / "out", ["train"], progress=False)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_obman_missing_files_are_named(obman_root, tmp_path):
    (obman_root / "train" / "rgb" / "00000001.jpg").unlink()
    with pytest.raises(OccError, match=r"rgb/00000001\.jpg \(image of .*00000001\.pkl\): file not found"):
        obman.convert(obman_root, tmp_path / "out", ["train"], progress=False)
    (obman_root / "test" / "segm" / "00000000.png").unlink()
    with pytest.raises(OccError, match=r"segm/00000000\.png"):
        obman.convert(obman_root, tmp_path / "out", ["test"], progress=False)
    (obman_root / "val" / "depth" / "00000000.png").unlink()
    with pytest.raises(OccError, match=r"depth/00000000\.png \(depth of .*\): file not found"):
        obman.convert(obman_root, tmp_path / "out", ["val"], progress=False)


def test_obman_truncated_jpeg(obman_root, tmp_path):
    jpg = obman_root / "train" / "rgb" / "00000000.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    with pytest.raises(OccError, match=r"00000000\.jpg .*truncated or corrupt"):
        obman.convert(obman_root, tmp_path / "out", ["train"], progress=False)
    assert not (tmp_path / "out").exists()


def test_obman_missing_split_named(obman_root, tmp_path):
    shutil.rmtree(obman_root / "val")
    with pytest.raises(OccError, match=r"val/meta: no such folder.*--splits"):
        obman.convert(obman_root, tmp_path / "out", ["train", "val"], progress=False)


def test_obman_occlusion_needs_object_only_render():
    segm = np.zeros((8, 8, 3), np.uint8)
    segm[2:6, 2:6, 0] = segm[2:6, 2:6, 2] = obman.OBJECT_INDEX
    segm[2:6, 2:3, 2] = 22  # the hand hides a quarter
    assert obman.occlusion_from_segm(segm) == pytest.approx(0.25)
    assert obman.occlusion_from_segm(segm[..., 2]) is None  # single channel: no amodal mask
    segm[..., 0] = 0
    assert obman.occlusion_from_segm(segm) is None


# --- ObMan: reconstruction and inference on the converted data --------------------------------------

@pytest.fixture(scope="module")
def obman_recon(obman_converted, tmp_path_factory):
    """A small reconstruction model trained a few steps on the converted ObMan training views."""
    import torch
    from conftest import SMALL_RECON
    from reconstruction.model import ReconConfig
    from reconstruction.train import ReconTrainArguments, train
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("obman_recon") / "model"
    args = ReconTrainArguments(data=str(obman_converted[0]), output_dir=str(out), steps=4, batch_size=2,
                               sdf_points=128, eikonal_points=16, colour_points=32, silhouette_rays=16, ray_samples=8,
                               save_steps=2, log_steps=2, progress=False)
    return train(args, ReconConfig(**SMALL_RECON))


def test_obman_reconstruction_trains_and_its_losses_move(obman_converted, obman_recon):
    from conftest import losses_before_and_after
    from reconstruction.supervision import TrainingViews
    log = [json.loads(x) for x in (obman_recon / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4] and all(np.isfinite(e["total"]) for e in log)
    views = TrainingViews(load_dataset(obman_converted[0]), "train")
    assert len(views) == 4 and len(views.scenes) == 4  # each real view is a scene of its own
    bank = views.bank(views.views[0]["id"])
    assert len(bank.surface) > 100 and (bank.sdf < 0).any() and (bank.sdf > 0).any()
    first, last = losses_before_and_after(views, 20)
    for key in ("sdf", "silhouette", "colour", "total"):
        assert last[key] < first[key], (key, first, last)


def test_obman_evaluate_reports_metrics_with_models_and_declines_without(obman_converted, obman_recon, tmp_path,
                                                                         capsys):
    from reconstruction import evaluate as evaluate_cmd
    out, _, _ = obman_converted
    argv = ["--checkpoint", str(obman_recon), "--resolution", "16", "--no-progress"]
    assert evaluate_cmd.main([*argv, "--data", str(out), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 2 and m["declined"] == {} and m["baseline"]["chamfer"] is not None
    assert m["baseline"]["silhouette_iou"] is not None and 0 <= m["baseline"]["fscore_10mm"] <= 1
    # the same dataset on a machine without the ShapeNet models: one line per metric it cannot compute
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    info = json.loads((moved / "dataset.json").read_text())
    info["model_roots"]["shapenet"] = str(tmp_path / "no-shapenet-here")
    (moved / "dataset.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert evaluate_cmd.main([*argv, "--data", str(moved), "--out", str(tmp_path / "m2.json")]) == 0
    printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("not computed")]
    assert printed == [f"not computed for 2 of 2 views: chamfer and F-scores: shapenet model files are not in "
                       f"{tmp_path / 'no-shapenet-here'}"]
    m2 = json.loads((tmp_path / "m2.json").read_text())
    assert m2["chamfer"] is None and m2["baseline"]["fscore_10mm"] is None
    assert m2["silhouette_iou"] == m["silhouette_iou"]  # ObMan's amodal masks still score the silhouette
    assert (tmp_path / "m2_by_occlusion.png").stat().st_size > 0  # plotted with the metrics it has


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cot", "dual"])
def test_obman_inference_reconstructs_and_answers(obman_converted, obman_recon, tiny_model, tmp_path, mode):
    import inference
    from data_tools import builders
    out, _, _ = obman_converted
    ds = load_dataset(out)
    test = builders.write_stage(builders.test_records(ds.split("test")), tmp_path / "test.jsonl", ds, "test")
    meta = json.loads((tmp_path / "test.meta.json").read_text())["test"]
    assert (tmp_path / meta["root"]).resolve() == ds.root.resolve()  # images: the ObMan root
    assert (tmp_path / meta["dataset"]).resolve() == out.resolve()   # masks and depth: the converted folder
    run = tmp_path / "run"
    extra = ["--alpha", "0.5"] + (["--gate", "0"] if mode == "cot" else [])
    assert inference.main(["--checkpoint", f"m={tiny_model}", "--data", str(test), "--out", str(run), "--mode", mode,
                           "--recon", str(obman_recon), "--recon-resolution", "16", "--batch-size", "2",
                           "--max-new-tokens", "4", "--device", "cpu", *extra]) == 0
    predictions = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in predictions) == sorted(v["id"] for v in ds.split("test"))
    assert sorted(p.stem for p in (run / "renders").glob("*.png")) == sorted(v["id"] for v in ds.split("test"))
    assert json.loads((run / "report.json").read_text())["rows"][0]["n"] == 2


def test_obman_reference_predictions_score_with_id_prefix(obman_converted, tmp_path, capsys):
    """The reference's predictions name ObMan views by file stem; --id-prefix maps them onto the
    converted ids, and without it the error says which prefix to pass."""
    import inference
    from data_tools import builders
    out, _, _ = obman_converted
    ds = load_dataset(out)
    views = ds.split("test")
    test = builders.write_stage(builders.test_records(views), tmp_path / "test.jsonl", ds, "test")
    stems = {v["id"].removeprefix("obman_test_"): v["category"] for v in views}
    # the first view answered right, every other one wrong
    answers = {s: f"The object is {c if k == 0 else ('jar' if c != 'jar' else 'can')}."
               for k, (s, c) in enumerate(sorted(stems.items()))}
    (tmp_path / "predictions-sc.json").write_text(json.dumps(answers))
    args = ["--score-reference", str(tmp_path / "predictions-sc.json"), "--data", str(test)]
    with pytest.raises(SystemExit):
        inference.main([*args, "--out", str(tmp_path / "bare")])
    assert "--id-prefix 'obman_test_'" in capsys.readouterr().err
    assert inference.main([*args, "--out", str(tmp_path / "r"), "--id-prefix", "obman_test_"]) == 0
    (row,) = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert row["n"] == len(views) and row["final_accuracy"] == pytest.approx(1 / len(views))


def test_obman_testset_keeps_the_reference_list(obman_converted, tmp_path):
    from data_tools import make_testset
    out, _, _ = obman_converted
    views = load_dataset(out).split("test")
    stem = views[-1]["id"].removeprefix("obman_test_")
    listing = tmp_path / "obman_view_test_all.txt"  # the reference's format: id, ref view, view, image path
    listing.write_text(f"{stem}\t0\t0\t/somewhere/obman/test/rgb/{stem}.jpg\n")
    test = tmp_path / "test.jsonl"
    assert make_testset.main(["--data", str(out), "--out", str(test), "--questions", "Q1", "--ids", str(listing),
                              "--id-prefix", "obman_test_"]) == 0
    assert [json.loads(x)["id"] for x in test.read_text().splitlines()] == [views[-1]["id"]]
    with pytest.raises(SystemExit):  # without the prefix no listed id is in the split
        make_testset.main(["--data", str(out), "--out", str(tmp_path / "t2.jsonl"), "--ids", str(listing)])
    assert not (tmp_path / "t2.jsonl").exists()
