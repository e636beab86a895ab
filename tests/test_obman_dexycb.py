"""ObMan and DexYCB converters on tiny fake dataset roots built in tmp_path."""
import json
import os
import pickle
import struct
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_tools import dexycb, obman
from data_tools.dataset import load_dataset
from occmllm.errors import OccError
from occmllm.questions import CATEGORY_ATTRIBUTES

SIZE = 32
BOTTLE, KNIFE = "02876657", "03624134"


def segm_array() -> np.ndarray:
    """An ObMan-style segm (RGB as read: object-only, hand-only, full scene): a 16x16 object whose
    left 16x4 strip is covered by the hand, so a quarter of it is hidden."""
    obj_only = np.zeros((SIZE, SIZE), np.uint8)
    obj_only[8:24, 8:24] = obman.OBJECT_INDEX
    hand_only = np.zeros((SIZE, SIZE), np.uint8)
    hand_only[8:24, 4:12] = 22
    full = np.where(hand_only > 0, hand_only, obj_only)
    return np.stack([obj_only, hand_only, full], axis=2)


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


def make_sample(root, split, stem, class_id=BOTTLE, meta_extra=None, protocol=pickle.DEFAULT_PROTOCOL):
    rgb = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    for folder in ("rgb", "segm"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / split / "rgb" / f"{stem}.jpg", quality=90)
    Image.fromarray(segm_array()).save(root / split / "segm" / f"{stem}.png")
    meta = {"class_id": class_id, "sample_id": "1a2b3c", "side": "right",
            "coords_2d": np.zeros((21, 2), np.float32), "coords_3d": np.ones((21, 3), np.float32),
            "verts_3d": np.zeros((778, 3), np.float32), "obj_visibility_ratio": np.float64(0.75),
            "affine_transform": np.eye(4, dtype=np.float32), "grasp_quality": 0.5,
            "obj_path": "/shapenet/02876657/1a2b3c/models/model_normalized.pkl", **(meta_extra or {})}
    write_meta(root / split / "meta" / f"{stem}.pkl", meta, protocol)
    return meta


@pytest.fixture
def obman_root(tmp_path):
    root = tmp_path / "obman"
    make_sample(root, "train", "00000000", BOTTLE, protocol=2)
    make_sample(root, "train", "00000001", KNIFE, protocol=5)
    make_sample(root, "test", "00000000", BOTTLE,
                meta_extra={"cam_extr": np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 0]], np.float32),
                            "cam_intr": np.array([[480, 0, 128], [0, 480, 128], [0, 0, 1]], np.float32)})
    return root


def test_obman_conversion_lines_and_dataset(obman_root, tmp_path):
    out = tmp_path / "out"
    info = obman.convert(obman_root, out, ["train", "test"], progress=False)
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["obman_train_00000000", "obman_train_00000001", "obman_test_00000000"]
    assert [r["category"] for r in lines] == ["bottle", "knife", "bottle"]
    first = lines[0]
    assert first["image"] == "train/rgb/00000000.jpg" and first["mask"] == "train/segm/00000000.png"
    assert first["split"] == "train" and first["source"] == "obman"
    assert first["attributes"] == CATEGORY_ATTRIBUTES["bottle"]
    assert first["occlusion"] == pytest.approx(0.25)
    assert (first["width"], first["height"]) == (SIZE, SIZE)
    assert "intrinsics" not in first and "world_to_cam" not in first  # not in that meta file
    assert lines[2]["intrinsics"][0] == [480.0, 0.0, 128.0]
    assert lines[2]["world_to_cam"][1] == [0.0, -1.0, 0.0, 0.0] and lines[2]["world_to_cam"][3] == [0, 0, 0, 1]
    for r in lines:
        assert not os.path.isabs(r["image"]) and (obman_root / r["image"]).resolve().is_relative_to(obman_root.resolve())
    stored = json.loads((out / "dataset.json").read_text())
    assert stored == info
    assert stored["name"] == "ObMan" and stored["root"] == str(obman_root.resolve())
    assert stored["views"] == 3 and stored["splits"] == {"train": 2, "test": 1}
    assert len(load_dataset(out).views) == 3  # the project's own reader accepts it


def test_obman_limit_and_python2_pickle(obman_root, tmp_path):
    meta = make_sample(obman_root, "val", "00000005", KNIFE)
    (obman_root / "val" / "meta" / "00000005.pkl").write_bytes(py2_pickle(meta))
    loaded = obman.load_meta(obman_root / "val" / "meta" / "00000005.pkl")
    assert np.array_equal(loaded["coords_3d"], meta["coords_3d"]) and loaded["obj_visibility_ratio"] == 0.75
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
def test_malicious_pickle_refused_and_nothing_written(obman_root, tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    write_meta(obman_root / "train" / "meta" / "00000001.pkl", {"class_id": BOTTLE, "x": payload(marker)})
    out = tmp_path / "out"
    with pytest.raises(OccError) as err:
        obman.convert(obman_root, out, ["train", "test"], progress=False)
    msg = str(err.value)
    assert "refuses to load pickle global" in msg and refused in msg
    assert str(obman_root / "train" / "meta" / "00000001.pkl") in msg
    assert not marker.exists()
    assert not out.exists() or list(out.iterdir()) == []


def test_malicious_pickle_cli_one_line_error(obman_root, tmp_path, capsys):
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
    assert exit_.value.code == 0 and "--splits" in capsys.readouterr().out


def test_unknown_class_id(obman_root, tmp_path):
    make_sample(obman_root, "train", "00000002", "02691156")  # airplane: not an ObMan class
    with pytest.raises(OccError, match=r"00000002\.pkl: unknown class_id '02691156'"):
        obman.convert(obman_root, tmp_path / "out", ["train"], progress=False)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_missing_image(obman_root, tmp_path):
    (obman_root / "train" / "rgb" / "00000001.jpg").unlink()
    with pytest.raises(OccError, match=r"rgb/00000001\.jpg \(image of .*00000001\.pkl\): file not found"):
        obman.convert(obman_root, tmp_path / "out", ["train"], progress=False)


def test_missing_segm(obman_root, tmp_path):
    (obman_root / "test" / "segm" / "00000000.png").unlink()
    with pytest.raises(OccError, match=r"segm/00000000\.png"):
        obman.convert(obman_root, tmp_path / "out", ["test"], progress=False)


def test_truncated_jpeg(obman_root, tmp_path):
    jpg = obman_root / "train" / "rgb" / "00000000.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    with pytest.raises(OccError, match=r"00000000\.jpg .*truncated or corrupt"):
        obman.convert(obman_root, tmp_path / "out", ["train"], progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_split_named(obman_root, tmp_path):
    with pytest.raises(OccError, match=r"val/meta: no such folder.*--splits"):
        obman.convert(obman_root, tmp_path / "out", ["train", "val"], progress=False)


def test_occlusion_needs_object_only_render():
    assert obman.occlusion_from_segm(segm_array()[..., 2]) is None  # single channel: no amodal mask
    empty = segm_array()
    empty[..., 0] = 0
    assert obman.occlusion_from_segm(empty) is None


# --- DexYCB ------------------------------------------------------------------------------------

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
