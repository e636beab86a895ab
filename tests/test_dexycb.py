"""DexYCB into the project's dataset: from DexYCB's own files (a small root in its layout,
``realdata_fixtures``: masks, depth, camera, object model and occlusion against what the fixture
encoded; bad inputs), and from a DexYCB-derived JSONL."""
import json
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_tools import dexycb
from occmllm.dataset import load_dataset
from occmllm.errors import OccError
from occmllm.questions import CATEGORY_ATTRIBUTES
from realdata_fixtures import DEX_SERIALS, DEX_SIZE, DEX_SUBJECT, make_dexycb_root, manifest, read_png

DEPTH_SCALE = 10000.0


# --- DexYCB from its own files ------------------------------------------------------------------

@pytest.fixture
def dex_fixture(tmp_path):
    return make_dexycb_root(tmp_path)


def test_dexycb_conversion_fields_grasped_object_hand_depth_and_occlusion(dex_fixture, tmp_path, capsys):
    root, truth = dex_fixture
    out = tmp_path / "out"
    assert dexycb.main(["--root", str(root), "--out", str(out), "--no-progress"]) == 0
    assert "skipped 6 views whose object has no ObMan category: {'025_mug': 6}" in capsys.readouterr().out
    lines = manifest(out)
    assert [r["id"] for r in lines] == list(truth)[:6]  # the can's sequence; the mug's is skipped
    info = json.loads((out / "dataset.json").read_text())
    assert info["depth_scale"] == DEPTH_SCALE and info["setup"] == "s0" and info["skipped_objects"] == {"025_mug": 6}
    assert info["model_roots"] == {"ycb": str((root / "models").resolve())}
    width, height = DEX_SIZE
    for line in lines:
        enc = truth[line["id"]]
        labels = np.load(root / line["image"].replace("color_", "labels_").replace(".jpg", ".npz"))
        assert line["category"] == "can" and line["ycb_object"] == "002_master_chef_can" and line["source"] == "dexycb"
        # ycb_ids [13, 1], ycb_grasp_ind 1: the can (1), not the bowl (13) that is also in view
        visible = read_png(out, line["mask_visible"]) > 127
        assert np.array_equal(visible, labels["seg"] == 1) and (labels["seg"] == 13).any()
        assert np.array_equal(read_png(out, line["mask_hand"]) > 127, labels["seg"] == 255)
        depth = read_png(out, line["depth"]).astype(np.float64) / DEPTH_SCALE
        hit = enc.depth > 0
        assert np.abs(depth[hit] - enc.depth[hit]).max() <= 0.0005 + 1e-9 and (depth[~hit] == 0).all()
        intr = line["intrinsics"]
        assert np.allclose(intr, enc.intrinsics) and np.allclose(line["world_to_cam"], np.eye(4))
        serial = line["image"].split("/")[2]
        calib = root / "calibration/intrinsics" / f"{serial}_{width}x{height}.yml"
        assert f"ppx: {intr[0][2] - 0.5}" in calib.read_text()  # the toolkit's pixel centres are at integers
        assert line["object_model"]["root"] == "ycb"
        assert line["object_model"]["path"] == "002_master_chef_can/textured_simple.obj"
        assert np.allclose(line["object_model"]["to_world"], enc.to_world, atol=1e-6)
        assert np.allclose(line["object_model"]["to_world"][:3], labels["pose_y"][1], atol=1e-6)
        amodal = read_png(out, line["mask_amodal"]) > 127
        assert (amodal ^ enc.amodal).sum() <= 0.02 * enc.amodal.sum()  # the model's render, as the fixture's
        assert line["occlusion"] == pytest.approx(1 - (visible & amodal).sum() / amodal.sum(), abs=1e-6)
        assert line["split"] == "train"  # s0: the first sequences of a subject are training ones
    from reconstruction.views import load_view
    ds = load_dataset(out)
    view = load_view(ds.roots, ds.views[0], DEPTH_SCALE)
    assert view.visible.any() and view.hand.any() and (view.depth > 0).any()


def test_dexycb_without_the_model_has_null_occlusion_and_evaluation_declines(dex_fixture, tmp_path):
    from reconstruction.truth import true_mesh
    root, _ = dex_fixture
    shutil.rmtree(root / "models" / "002_master_chef_can")
    dexycb_root_convert(root, tmp_path / "out", limit=1)
    line = manifest(tmp_path / "out")[0]
    assert line["occlusion"] is None and "mask_amodal" not in line and "object_model" in line
    mesh, why = true_mesh(load_dataset(tmp_path / "out"), line)
    assert mesh is None and why == f"ycb model files are not in {(root / 'models').resolve()}"


def dexycb_root_convert(root, out, **kwargs):
    from data_tools.dexycb_root import convert_root
    return convert_root(root, out, progress=False, **kwargs)


def test_dexycb_subjects_limit_stride_and_setups(dex_fixture, tmp_path):
    root, _ = dex_fixture
    info = dexycb_root_convert(root, tmp_path / "a", subjects=[DEX_SUBJECT], limit=1)
    assert info["views"] == len(DEX_SERIALS)
    info = dexycb_root_convert(root, tmp_path / "b", stride=2, setup="s2")
    assert info["views"] == 2 * len(DEX_SERIALS) and info["splits"] == {"train": 4}
    with pytest.raises(OccError, match="not a DexYCB subject folder"):
        dexycb_root_convert(root, tmp_path / "c", subjects=["20200813-subject-02"])
    with pytest.raises(OccError, match="--setup 's9'"):
        dexycb_root_convert(root, tmp_path / "c", setup="s9")
    assert not (tmp_path / "c").exists()


def test_dexycb_missing_calibration_is_one_line_and_nothing_written(dex_fixture, tmp_path, capsys):
    root, _ = dex_fixture
    calib = root / "calibration/intrinsics" / f"{DEX_SERIALS[1]}_{DEX_SIZE[0]}x{DEX_SIZE[1]}.yml"
    calib.unlink()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        dexycb.main(["--root", str(root), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: {calib}: not found; DexYCB's intrinsics of camera {DEX_SERIALS[1]} is needed")
    assert not out.exists()


def test_dexycb_damaged_labels_are_named(dex_fixture, tmp_path):
    root, _ = dex_fixture
    labels = root / DEX_SUBJECT / "20200709_141754" / DEX_SERIALS[0] / "labels_000001.npz"
    np.savez(labels, seg=np.zeros((2, 2), np.uint8), pose_y=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(OccError, match=r"labels_000001\.npz: seg \(2, 2\)"):
        dexycb_root_convert(root, tmp_path / "out")
    labels.write_bytes(b"not a zip")
    with pytest.raises(OccError, match=r"labels_000001\.npz: not a readable \.npz"):
        dexycb_root_convert(root, tmp_path / "out")


# --- DexYCB from a derived JSONL ----------------------------------------------------------------

@pytest.fixture
def dex_root(tmp_path):
    root = tmp_path / "dexycb"
    for i in range(6):
        path = root / "20200709-subject-01" / "20200709_141754" / "836212060125" / f"color_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path)
    return root


def _img(i):
    return f"20200709-subject-01/20200709_141754/836212060125/color_{i:06d}.jpg"


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_dexycb_mapping_and_skips(dex_root, tmp_path):
    jsonl = write_lines(tmp_path / "dex.jsonl", [
        {"image": _img(0), "ycb_name": "006_mustard_bottle", "split": "train"},
        {"color_file": _img(1), "ycb_id": 13,  # 024_bowl
         "intrinsics": {"fx": 616.0, "fy": 616.5, "ppx": 320.0, "ppy": 240.0}},
        {"image": _img(2), "ycb_ids": [14, 4], "ycb_grasp_ind": 1, "occlusion": 0.4},  # 005_tomato_soup_can
        {"image": _img(3), "object": "mug"},
        {"image": _img(4), "ycb_id": 18},  # 040_large_marker
        {"image": _img(5), "object": "025_mug"},
    ])
    skipped = Counter()
    records = dexycb.read_dexycb(jsonl, dex_root, skipped=skipped)
    assert [r["category"] for r in records] == ["bottle", "bowl", "can"]
    assert [r["split"] for r in records] == ["train", "test", "test"]
    assert records[0]["image"] == _img(0) and records[1]["image"] == _img(1)
    assert records[0]["id"] == "dexycb_" + _img(0)[:-4].replace("/", "_")
    assert records[1]["intrinsics"] == [[616.0, 0.0, 320.0], [0.0, 616.5, 240.0], [0.0, 0.0, 1.0]]
    assert records[2]["occlusion"] == 0.4 and records[0]["occlusion"] is None
    assert all(r["source"] == "dexycb" and r["attributes"] == CATEGORY_ATTRIBUTES[r["category"]] for r in records)
    assert skipped == Counter({"025_mug": 2, "040_large_marker": 1})
    with pytest.warns(UserWarning, match="skipped 3 lines"):
        assert len(dexycb.read_dexycb(jsonl, dex_root)) == 3


def test_dexycb_cli_writes_dataset(dex_root, tmp_path, capsys):
    jsonl = write_lines(tmp_path / "dex.jsonl", [{"image": _img(0), "ycb_name": "bowl"},
                                                 {"image": _img(1), "ycb_name": "banana"}])
    out = tmp_path / "out"
    assert dexycb.main(["--jsonl", str(jsonl), "--root", str(dex_root), "--out", str(out)]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["name"] == "DexYCB" and info["root"] == str(dex_root.resolve())
    assert info["views"] == 1 and info["skipped_objects"] == {"011_banana": 1}
    assert "skipped 1 lines" in capsys.readouterr().out
    assert load_dataset(out).views[0]["category"] == "bowl"


@pytest.mark.parametrize("bad, message", [
    ('{"image": "x.jpg", "ycb_name": ', r"dex\.jsonl:3: not valid JSON"),
    ({"image": _img(2), "ycb_name": "toaster"}, r"dex\.jsonl:3: unknown YCB object 'toaster'"),
    ({"image": _img(2), "ycb_id": 22}, r"dex\.jsonl:3: YCB object id 22"),
    ({"image": _img(2)}, r"dex\.jsonl:3: no object given"),
    ({"ycb_id": 1}, r"dex\.jsonl:3: no image path"),
    ({"image": "missing.jpg", "ycb_id": 1}, r"dex\.jsonl:3: image 'missing\.jpg' not found"),
    ({"image": "../outside.jpg", "ycb_id": 1}, r"dex\.jsonl:3: .*escapes the dataset root"),
    ({"image": _img(0), "ycb_id": 1}, r"dex\.jsonl:3: duplicate id"),
    ({"image": _img(2), "ycb_id": 1, "occlusion": 1.5}, r"dex\.jsonl:3: occlusion 1\.5"),
])
def test_dexycb_malformed_line_names_file_and_line(dex_root, tmp_path, bad, message):
    jsonl = write_lines(tmp_path / "dex.jsonl", [{"image": _img(0), "ycb_id": 5},
                                                 {"image": _img(1), "ycb_id": 14}, bad])
    with pytest.raises(OccError, match=message):
        dexycb.read_dexycb(jsonl, dex_root, skipped=Counter())
