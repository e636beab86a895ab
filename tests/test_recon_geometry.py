"""Reconstruction geometry against closed-form answers: metrics, silhouettes, mesh extraction, colours."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from occmllm.render import Camera, RayCaster, render_rgb, render_vertex_colours
from reconstruction.extract import extract_mesh, level_sizes
from reconstruction.metrics import (by_occlusion, mean_metrics, point_tree, sample_surface, silhouette_iou,
                                    surface_metrics)

BOX_LO, BOX_HI = (-0.15, -0.15, -0.15), (0.15, 0.15, 0.15)  # a 0.3 m box, hand-object scale


def _sphere(radius: float, centre=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    mesh.apply_translation(centre)
    return mesh


def sphere_sdf(points: np.ndarray, radius: float = 0.05) -> np.ndarray:
    return np.linalg.norm(points, axis=1) - radius


def rounded_box_sdf(points: np.ndarray, half=(0.06, 0.03, 0.04), rounding: float = 0.01) -> np.ndarray:
    """Exact distance to a box with rounded edges (the box shrunk by ``rounding``, then inflated)."""
    q = np.abs(points) - (np.asarray(half) - rounding)
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
    inside = np.minimum(q.max(axis=1), 0.0)
    return outside + inside - rounding


# ---------------------------------------------------------------- metrics

def test_chamfer_of_concentric_spheres_is_the_radius_gap():
    r1, r2 = 0.05, 0.06
    inner, outer = sample_surface(_sphere(r1), 20000, seed=0), sample_surface(_sphere(r2), 20000, seed=1)
    assert inner.shape == (20000, 3) and inner.dtype == np.float64
    m = surface_metrics(inner, outer, thresholds=(0.005, 0.02))
    assert m == surface_metrics(inner, outer, thresholds=(0.005, 0.02), true_tree=point_tree(outer))  # a tree built once
    assert m["chamfer_mm"] == pytest.approx(1000 * (r2 - r1), rel=0.03)
    assert m["fscore_5mm"] == 0.0 and m["precision_5mm"] == 0.0 and m["recall_5mm"] == 0.0
    assert m["fscore_20mm"] == 1.0 and m["precision_20mm"] == 1.0 and m["recall_20mm"] == 1.0


def test_metrics_match_every_pairwise_distance():
    # nearest neighbours from the full distance matrix, independent of the KD-tree; float32 and
    # strided input (a column slice) give the same figures as float64
    rng = np.random.default_rng(0)
    pred = rng.normal(scale=0.02, size=(700, 3))
    true = np.concatenate([pred[:100] + 0.004, rng.normal(scale=0.03, size=(500, 3))])
    dist = np.linalg.norm(pred[:, None] - true[None], axis=2)
    to_true, to_pred = dist.min(axis=1), dist.min(axis=0)
    m = surface_metrics(pred, true)
    assert m["chamfer_mm"] == pytest.approx(1000 * 0.5 * (to_true.mean() + to_pred.mean()), rel=1e-12)
    for tau, label in ((0.005, "5mm"), (0.01, "10mm")):
        precision, recall = np.mean(to_true <= tau), np.mean(to_pred <= tau)
        assert m[f"precision_{label}"] == precision and m[f"recall_{label}"] == recall
        assert m[f"fscore_{label}"] == pytest.approx(2 * precision * recall / (precision + recall))
    wide = np.zeros((len(pred), 6))
    wide[:, ::2] = pred
    assert surface_metrics(wide[:, ::2], true.astype(np.float32))["chamfer_mm"] == pytest.approx(m["chamfer_mm"], rel=1e-6)


def test_fscore_of_identical_and_distant_surfaces():
    sphere = _sphere(0.05)
    a, b = sample_surface(sphere, 20000, seed=0), sample_surface(sphere, 20000, seed=1)
    same = surface_metrics(a, b)
    assert same["fscore_5mm"] == 1.0 and same["fscore_10mm"] == 1.0
    assert same["chamfer_mm"] < 1.0  # only the sampling density separates two samplings
    assert surface_metrics(a, a)["chamfer_mm"] == 0.0
    far = surface_metrics(a, sample_surface(_sphere(0.05, centre=(1.0, 0.0, 0.0)), 20000))
    assert far["fscore_5mm"] == 0.0 and far["fscore_10mm"] == 0.0
    # a point on one sphere is |p - c| - r from the other; over a sphere of radius r the mean of
    # |p - c| for a centre c at distance d > r is d + r^2 / (3 d)
    r, d = 0.05, 1.0
    assert far["chamfer_mm"] == pytest.approx(1000 * (d + r * r / (3 * d) - r), rel=0.01)


def test_empty_prediction_scores_zero_and_has_no_chamfer():
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    points = sample_surface(empty, 1000)
    assert points.shape == (0, 3)
    m = surface_metrics(points, sample_surface(_sphere(0.05), 1000))
    assert m["chamfer_mm"] is None
    assert set(m) == {"chamfer_mm", "fscore_5mm", "fscore_10mm", "precision_5mm", "recall_5mm",
                      "precision_10mm", "recall_10mm"}
    assert all(m[k] == 0.0 for k in m if k != "chamfer_mm")


def test_silhouette_iou_basics():
    a = np.zeros((4, 4), dtype=bool)
    assert silhouette_iou(a, a) == 1.0  # both empty agree
    b = a.copy()
    b[:2] = True
    assert silhouette_iou(b, b) == 1.0 and silhouette_iou(a, b) == 0.0
    c = a.copy()
    c[1:3] = True
    assert silhouette_iou(b, c) == pytest.approx(4 / 12)
    with pytest.raises(ValueError):
        silhouette_iou(a, np.zeros((3, 3), dtype=bool))


def test_means_skip_none_and_bins_by_occlusion():
    rows = [{"occlusion": 0.1, "chamfer_mm": 2.0, "fscore_5mm": 0.5},
            {"occlusion": 0.15, "chamfer_mm": None, "fscore_5mm": 0.0},
            {"occlusion": 1.0, "chamfer_mm": 6.0, "fscore_5mm": 1.0}]
    assert mean_metrics(rows, ["chamfer_mm", "fscore_5mm"]) == {"chamfer_mm": 4.0, "fscore_5mm": 0.5}
    assert mean_metrics(rows[1:2], ["chamfer_mm"]) == {"chamfer_mm": None}
    bins = by_occlusion(rows, keys=["chamfer_mm", "fscore_5mm"])
    assert [b["bin"] for b in bins] == ["0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"]
    assert [b["n"] for b in bins] == [2, 0, 0, 0, 1]
    assert bins[0]["chamfer_mm"] == 2.0 and bins[0]["fscore_5mm"] == 0.25
    assert bins[1]["chamfer_mm"] is None and bins[4]["fscore_5mm"] == 1.0  # full occlusion lands in the last bin


# ---------------------------------------------------------------- rendering

def _axis_camera(distance: float, size: int = 128, focal: float = 150.0) -> Camera:
    return Camera.look_at((distance, 0.0, 0.0), (0.0, 0.0, 0.0), focal, size, size)


def _pixel_offsets(camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets from the principal point, (H, W) each."""
    u, v = np.meshgrid(np.arange(camera.width) + 0.5, np.arange(camera.height) + 0.5)
    return u - camera.intrinsics[0, 2], v - camera.intrinsics[1, 2]


def test_sphere_silhouette_matches_the_analytic_disc():
    radius, distance, focal = 0.05, 0.3, 150.0
    camera = _axis_camera(distance, focal=focal)
    hits = RayCaster([_sphere(radius)]).render(camera)
    silhouette = (hits.label >= 0).reshape(camera.height, camera.width)
    # the tangent cone of a sphere has half-angle asin(R / D): its image is a disc of radius f tan
    disc_radius = focal * radius / np.sqrt(distance ** 2 - radius ** 2)
    du, dv = _pixel_offsets(camera)
    disc = du ** 2 + dv ** 2 <= disc_radius ** 2
    assert silhouette_iou(silhouette, disc) >= 0.98


def test_vertex_colours_render_red_inside_and_background_outside():
    sphere = _sphere(0.05)
    camera = _axis_camera(0.3)
    caster = RayCaster([sphere])
    red = np.tile([1.0, 0.0, 0.0], (len(sphere.vertices), 1))
    image = render_vertex_colours(caster, camera, red)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    inside = (caster.render(camera).label == 0).reshape(128, 128)
    assert inside.sum() > 1000
    assert (image[inside][:, 0] > 0).all() and (image[inside][:, 1:] == 0).all()
    assert (image[~inside] == 128).all()  # background 0.5 grey
    # one colour everywhere renders exactly like the per-mesh renderer
    assert np.array_equal(image, render_rgb(caster, camera, [(1.0, 0.0, 0.0)]))


def test_vertex_colours_are_interpolated_barycentrically():
    """A colour linear in y is reproduced exactly inside each triangle: red share = (y / R + 1) / 2."""
    radius = 0.05
    sphere = _sphere(radius)
    camera = _axis_camera(0.3)
    caster = RayCaster([sphere])
    share = (sphere.vertices[:, 1] / radius + 1.0) / 2.0
    image = render_vertex_colours(caster, camera, np.stack([share, np.zeros_like(share), 1.0 - share], axis=1))
    hits = caster.render(camera)
    inside = hits.label == 0
    pixels = image.reshape(-1, 3)[inside].astype(np.float64)
    red_share = pixels[:, 0] / (pixels[:, 0] + pixels[:, 2])  # shading scales both channels alike
    expected = (hits.location[inside, 1] / radius + 1.0) / 2.0
    assert np.abs(red_share - expected).max() < 0.02


def test_empty_mesh_renders_the_background():
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    image = render_vertex_colours(RayCaster([empty]), _axis_camera(0.3, size=16), np.zeros((0, 3)),
                                  background=(0.0, 1.0, 0.0))
    assert image.shape == (16, 16, 3) and (image == [0, 255, 0]).all()


# ---------------------------------------------------------------- mesh extraction

@pytest.mark.parametrize("name, sdf, resolution", [("sphere", sphere_sdf, 129), ("rounded box", rounded_box_sdf, 128)])
def test_coarse_to_fine_matches_dense_with_fewer_evaluations(name, sdf, resolution):
    dense, dense_evals = extract_mesh(sdf, BOX_LO, BOX_HI, resolution, mode="dense")
    fast, fast_evals = extract_mesh(sdf, BOX_LO, BOX_HI, resolution, mode="coarse_to_fine")
    ratio = dense_evals / fast_evals
    print(f"{name} at {resolution}^3: dense {dense_evals} evaluations, coarse-to-fine {fast_evals}, "
          f"ratio {ratio:.1f}x (levels {level_sizes(resolution)})")
    assert dense_evals == resolution ** 3
    assert ratio >= 5
    assert len(dense.faces) > 1000 and dense.is_watertight
    # the same sampling seed on both meshes: equal meshes give equal points, so any gap is the mesh's
    m = surface_metrics(sample_surface(fast, 20000, seed=0), sample_surface(dense, 20000, seed=0))
    assert m["chamfer_mm"] < 0.1
    assert fast.vertices.shape == dense.vertices.shape
    assert np.abs(fast.vertices - dense.vertices).max() < 1e-9


def test_a_margin_of_one_diagonal_is_exact_for_a_distance_field():
    """A small sphere between the coarse grid's points changes the sign of none of them: the margin
    (1 cell diagonal for an exact distance) is what finds it, and without it the mesh is lost."""
    centre = np.array([0.0186, 0.0186, 0.0186])  # mid-cell of the 9^3 grid (cells 0.0375 m)

    def small_sphere(points):
        return np.linalg.norm(points - centre, axis=1) - 0.008

    dense, dense_evals = extract_mesh(small_sphere, BOX_LO, BOX_HI, 33, mode="dense")
    fast, fast_evals = extract_mesh(small_sphere, BOX_LO, BOX_HI, 33, coarse=9, margin_factor=1.0)
    assert len(dense.faces) > 0 and fast_evals < dense_evals / 10
    assert fast.vertices.shape == dense.vertices.shape and np.abs(fast.vertices - dense.vertices).max() < 1e-9
    blind, _ = extract_mesh(small_sphere, BOX_LO, BOX_HI, 33, coarse=9, margin_factor=0.0)
    assert len(blind.faces) == 0


def test_coarse_to_fine_tolerates_an_inexact_learned_like_sdf():
    """A warped field that overstates distances by 1.4x (still within the margin) meshes as densely."""
    def warped(points):
        bumps = 0.01 * np.sin(40 * points[:, 0]) * np.cos(30 * points[:, 1])
        return 1.4 * (np.linalg.norm(points, axis=1) - 0.05 - bumps)
    dense, _ = extract_mesh(warped, BOX_LO, BOX_HI, 65, mode="dense", coarse=17)
    fast, _ = extract_mesh(warped, BOX_LO, BOX_HI, 65, coarse=17)
    assert fast.vertices.shape == dense.vertices.shape and np.abs(fast.vertices - dense.vertices).max() < 1e-9


@pytest.mark.parametrize("mode", ["dense", "coarse_to_fine"])
@pytest.mark.parametrize("constant", [1.0, -1.0])
def test_field_without_a_zero_crossing_gives_an_empty_mesh(mode, constant):
    mesh, evals = extract_mesh(lambda p: np.full(len(p), constant), BOX_LO, BOX_HI, 33, mode=mode, coarse=9)
    assert len(mesh.faces) == 0 and evals > 0


def test_extraction_calls_the_sdf_in_chunks_and_checks_arguments():
    sizes = []

    def counting_sdf(points):
        sizes.append(len(points))
        return sphere_sdf(points)
    _, evals = extract_mesh(counting_sdf, BOX_LO, BOX_HI, 33, mode="dense", chunk=1000)
    assert max(sizes) <= 1000 and sum(sizes) == evals == 33 ** 3
    assert level_sizes(129, 32) == [33, 65, 129] and level_sizes(128, 32) == [33, 65, 128]
    assert level_sizes(20, 32) == [20]
    with pytest.raises(ValueError):
        extract_mesh(sphere_sdf, BOX_LO, BOX_HI, 33, mode="octree")
    with pytest.raises(ValueError):
        extract_mesh(sphere_sdf, BOX_HI, BOX_LO, 33)
    with pytest.raises(ValueError):
        extract_mesh(lambda p: np.zeros(3), BOX_LO, BOX_HI, 9, mode="dense")
