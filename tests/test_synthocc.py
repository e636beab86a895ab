"""SynthOcc: geometry, masks, depth, occlusion, exact shapes, splits and determinism."""
import filecmp
import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import trimesh
from PIL import Image

from data_tools import sdf, synthocc
from occmllm import fileio
from occmllm.dataset import load_dataset
from occmllm.questions import CATEGORIES, CATEGORY_ATTRIBUTES


def _png(root, rel):
    return np.asarray(Image.open(root / rel))


def test_layout_and_manifest(synth):
    ds = load_dataset(synth)
    info = json.loads((synth / "dataset.json").read_text())
    assert len(ds.views) == 16 * 4 == info["views"]
    assert {v["category"] for v in ds.views} == set(CATEGORIES)
    splits = json.loads((synth / "splits.json").read_text())
    scenes = [s for name in ("train", "val", "test") for s in splits[name]]
    assert len(scenes) == len(set(scenes)) == 16  # every scene in exactly one split
    for v in ds.views:
        assert v["split"] in splits and v["scene"] in splits[v["split"]]
        assert v["attributes"] == CATEGORY_ATTRIBUTES[v["category"]]
        for key in synthocc.VIEW_FILES:
            rel = v["image"] if key == "rgb" else v[key]
            assert not rel.startswith("/") and (synth / rel).is_file()


def test_masks_depth_and_occlusion_agree(synth):
    ds = load_dataset(synth)
    scale = json.loads((synth / "dataset.json").read_text())["depth_scale"]
    for v in ds.views:
        amodal = _png(synth, v["mask_amodal"]) > 0
        visible = _png(synth, v["mask_visible"]) > 0
        hand = _png(synth, v["mask_hand"]) > 0
        depth = _png(synth, v["depth"]).astype(float) / scale
        depth_obj = _png(synth, v["depth_object"]).astype(float) / scale
        # visible = amodal minus the pixels the hand covers
        assert np.array_equal(visible, amodal & ~hand)
        # depth is set exactly where something (object or hand) is seen
        assert np.array_equal(depth > 0, visible | hand)
        assert np.array_equal(depth_obj > 0, amodal)
        # where the object is visible, the scene depth is the object's; where the hand hides it,
        # the hand is in front of it
        assert np.allclose(depth[visible], depth_obj[visible])
        hidden = amodal & hand
        assert np.all(depth[hidden] <= depth_obj[hidden])  # equal where a finger touches it
        # occlusion ratio = 1 - visible / amodal area
        assert v["occlusion"] == pytest.approx(1 - visible.sum() / amodal.sum(), abs=1e-6)
        # the image without the hand differs from the one with it only where the hand is
        rgb, rgb_nohand = _png(synth, v["image"]), _png(synth, v["rgb_nohand"])
        assert np.array_equal(rgb[~hand], rgb_nohand[~hand])


def test_occlusion_spreads(synth):
    occ = np.array([v["occlusion"] for v in load_dataset(synth).views])
    assert occ.min() < 0.05 and occ.max() >= 0.8


def test_exact_sdf_matches_mesh(synth):
    rng = np.random.default_rng(0)
    for scene_dir in sorted((synth / "scenes").iterdir())[:8]:
        scene = json.loads((scene_dir / "scene.json").read_text())
        mesh = trimesh.load(scene_dir / "object.ply", process=False)
        assert mesh.is_watertight
        # points near and around the surface
        pts = np.concatenate([mesh.sample(600, seed=1) + rng.normal(0, 0.01, (600, 3)),
                              rng.uniform(mesh.bounds[0] - 0.02, mesh.bounds[1] + 0.02, (600, 3))])
        d = sdf.scene_sdf(scene, pts)
        far = np.abs(d) > 0.003  # beyond the mesh's marching-cubes error
        inside = mesh.contains(pts[far])
        assert np.mean(inside == (d[far] < 0)) > 0.995, scene["scene"]
        assert (d < 0).any() and (d > 0).any()
        # on the surface the SDF is ~0 (within marching-cubes error)
        assert np.abs(sdf.scene_sdf(scene, mesh.vertices)).max() < 0.003


def test_shapes_keep_their_attributes_and_sizes():
    """Every family keeps its documented geometric attributes (round, long, thin) and size."""
    from data_tools import shapes
    rng = np.random.default_rng(0)
    for cat in CATEGORIES:
        for _ in range(6):
            shape, mesh = shapes.make_object(cat, rng, 0.0025)
            ext = np.sort(mesh.extents)[::-1]
            attrs = CATEGORY_ATTRIBUTES[cat]
            assert 0.05 <= ext[0] <= 0.25, (cat, ext)
            assert (ext[0] >= 2.3 * ext[1]) == attrs["long"], (cat, ext)
            assert (ext[2] < 0.015) == attrs["thin"], (cat, ext)
            # round: a solid of revolution about z, so its SDF is unchanged by a turn about z
            pts = rng.uniform(-0.1, 0.1, (500, 3))
            c, s = np.cos(1.0), np.sin(1.0)
            turned = pts @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T
            change = np.abs(sdf.evaluate(shape, pts) - sdf.evaluate(shape, turned)).max()
            assert (change < 1e-6) == attrs["round"], (cat, change)


def test_grid_sdf_is_exact_near_the_surface_and_meshes_as_the_full_field():
    """``sdf.evaluate_grid`` skips each primitive far from its box: near the surface its values are
    ``evaluate``'s, farther away only the sign and a lower bound on the size hold, and the mesh is
    the one the fully evaluated grid gives (objects of every family, with their subtractions and
    intersections, and hands). On the demo's scenes both were the same bit for bit; the check
    allows a last-bit difference, as a BLAS may round a product differently in a shorter array."""
    from data_tools import shapes
    from occmllm import meshing
    rng = np.random.default_rng(5)
    for cat in CATEGORIES:
        for cell in (0.0025, 0.005):
            shape, mesh = shapes.make_object(cat, rng, cell)
            for part in (shape, shapes.make_hand(cat, mesh.extents / 2, rng)):
                lo, hi, counts = shapes.mesh_grid(part, cell)
                points, spacing = meshing.grid_points(lo, hi, counts)
                full = sdf.evaluate(part, points).reshape(counts)
                band = shapes.EXACT_DIAGONALS * float(np.linalg.norm(spacing))
                grid = sdf.evaluate_grid(part, meshing.grid_axes(lo, hi, counts)[0], exact_within=band)
                near = np.abs(full) < band
                assert 0 < near.sum() < near.size
                np.testing.assert_allclose(grid[near], full[near], rtol=0, atol=1e-12)
                assert np.array_equal(grid[~near] < 0, full[~near] < 0) and np.all(np.abs(grid[~near]) >= band)
                expected = meshing.mesh_from_sdf_grid(full, lo, spacing)
                got = shapes.mesh_shape(part, cell)
                assert len(got.faces) > 100
                assert np.array_equal(got.faces, expected.faces)
                np.testing.assert_allclose(got.vertices, expected.vertices, rtol=0, atol=1e-12)


def _same_tree(a, b):
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
    assert not mismatch and not errors, mismatch[:5]


def test_deterministic_whatever_the_workers(tmp_path):
    s = synthocc.Settings(scenes=3, views=2, seed=11)
    a = synthocc.generate(tmp_path / "a", s, workers=1, progress=False)
    b = synthocc.generate(tmp_path / "b", s, workers=2, progress=False)
    _same_tree(a, b)
    c = synthocc.generate(tmp_path / "c", synthocc.Settings(scenes=3, views=2, seed=12), workers=1, progress=False)
    assert (a / "scenes/s00000/rgb_00.png").read_bytes() != (c / "scenes/s00000/rgb_00.png").read_bytes()


def test_extra_scenes_leave_training_as_it_is(tmp_path):
    """Larger evaluation splits (--extra-test-scenes, --extra-val-scenes) must not touch a training
    scene, nor move any of the first scenes to another split: the models trained on them stay
    valid, and the old test and validation views stay among the new ones."""
    base = synthocc.Settings(scenes=16, views=1, seed=4, size=32, focal=40.0)
    plain = synthocc.generate(tmp_path / "plain", base, progress=False)
    grown = synthocc.generate(tmp_path / "grown", replace(base, extra_test=8, extra_val=8), progress=False)
    splits, grown_splits = (fileio.read_json(d / "splits.json") for d in (plain, grown))
    extra_test = [synthocc.scene_id(i) for i in range(16, 24)]
    extra_val = [synthocc.scene_id(i) for i in range(24, 32)]
    assert grown_splits["train"] == splits["train"]
    assert grown_splits["test"] == sorted(splits["test"] + extra_test)
    assert grown_splits["val"] == sorted(splits["val"] + extra_val)
    lines = {m["id"]: m for _, m in fileio.iter_jsonl(plain / "manifest.jsonl")}
    grown_lines = {m["id"]: m for _, m in fileio.iter_jsonl(grown / "manifest.jsonl")}
    assert {k: grown_lines[k] for k in lines} == lines  # the first 16 scenes, split included, unchanged
    for sid in splits["train"] + splits["val"] + splits["test"]:
        _same_tree(plain / "scenes" / sid, grown / "scenes" / sid)
    # each set of extra scenes is balanced over the categories, as every scene set is
    for extra in (extra_test, extra_val):
        counts = Counter(grown_lines[synthocc.view_id(sid, 0)]["category"] for sid in extra)
        assert sorted(counts) == sorted(CATEGORIES) and set(counts.values()) == {1}
    per_split = fileio.read_json(grown / "dataset.json")["scenes_per_split"]
    assert per_split == {"train": len(splits["train"]), "val": len(splits["val"]) + 8, "test": len(splits["test"]) + 8}


def test_resume_after_interruption(tmp_path, monkeypatch):
    s = synthocc.Settings(scenes=3, views=2, seed=5)
    reference = synthocc.generate(tmp_path / "ref", s, progress=False)
    real = synthocc.generate_scene
    calls = []

    def flaky(index, *args, **kw):
        calls.append(index)
        if index == 2 and len(calls) < 4:
            raise KeyboardInterrupt
        return real(index, *args, **kw)

    monkeypatch.setattr(synthocc, "generate_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        synthocc.generate(tmp_path / "out", s, progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-done under the final name
    assert (tmp_path / "out.partial/scenes/s00001/scene.json").is_file()
    synthocc.generate(tmp_path / "out", s, progress=False)
    assert calls == [0, 1, 2, 2]  # scenes 0 and 1 were not redone
    assert not (tmp_path / "out.partial").exists()
    _same_tree(reference, tmp_path / "out")


def test_cli_help_and_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "data_tools.synthocc", *a], capture_output=True, text=True)
    out = run("--help")
    assert out.returncode == 0 and "--scenes" in out.stdout and "--seed" in out.stdout
    (tmp_path / "exists").mkdir()
    out = run("--out", str(tmp_path / "exists"), "--scenes", "1")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "already exists" in out.stderr
    assert out.stderr.count("\n") == 1  # one line, no traceback


def test_fingerprints_tell_where_two_demos_part(synth, tmp_path, capsys):
    """benchmarks/fingerprint.py: the same dataset in two places has the same fingerprint, one
    changed pixel gives another, and the parts a demo has not made yet read as absent."""
    import shutil
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fingerprint import main as fingerprint

    def prints(demo):
        assert fingerprint(["--demo", str(demo)]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(synth, one / "data")
    shutil.copytree(synth, two / "data")
    first = prints(one)
    assert first == prints(two)
    assert first["dataset"]["files"] > len(list(synth.glob("scenes/*")))
    assert first["checkpoint step1"] is None and first["predictions report"] is None
    image = next((two / "data").glob("scenes/**/*.png"))
    pixels = np.array(Image.open(image))
    pixels.flat[0] ^= 1
    Image.fromarray(pixels).save(image)
    assert prints(two)["dataset"]["sha256"] != first["dataset"]["sha256"]
