"""Procedural object families (ObMan's eight categories) and the hand occluder, as SDF specs.

Objects are built in a canonical frame: metres, bounding box centred at the origin, long axis
(if any) along z. Proportions are drawn so each family keeps the geometric attributes of
``occmllm.questions.CATEGORY_ATTRIBUTES`` (round = solid of revolution about z; long = longest
extent >= 2.3x the second; thin = smallest extent < 1.5 cm) and a largest extent of 5-25 cm.
Colour never depends on the category: it is drawn by the renderer from one palette for all.
"""
from __future__ import annotations

import math

import numpy as np

import trimesh

from data_tools import sdf
from occmllm import meshing


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def bottle(rng):
    r = _u(rng, 0.025, 0.037)
    body_h = _u(rng, 0.12, 0.15)
    shoulder_h = _u(rng, 0.03, 0.045)
    neck_r = _u(rng, 0.011, 0.016)
    neck_h = _u(rng, 0.02, 0.035)
    cap_h = _u(rng, 0.012, 0.018)
    z0 = 0.0
    return [
        dict(type="cylinder", center=[0, 0, z0 + body_h / 2], radius=r, half_height=body_h / 2, rounding=0.006),
        dict(type="cone", center=[0, 0, z0 + body_h + shoulder_h / 2 - 0.002], radius_bottom=r - 0.001,
             radius_top=neck_r, half_height=shoulder_h / 2),
        dict(type="cylinder", center=[0, 0, z0 + body_h + shoulder_h + neck_h / 2 - 0.004], radius=neck_r,
             half_height=neck_h / 2 + 0.002),
        dict(type="cylinder", center=[0, 0, z0 + body_h + shoulder_h + neck_h + cap_h / 2 - 0.004],
             radius=neck_r + 0.002, half_height=cap_h / 2, rounding=0.002),
    ]


def bowl(rng):
    outer = _u(rng, 0.06, 0.09)
    wall = _u(rng, 0.004, 0.007)
    rim_z = _u(rng, -0.05, 0.25) * outer
    foot_r = _u(rng, 0.3, 0.45) * outer
    return [
        dict(type="sphere", center=[0, 0, 0], radius=outer),
        dict(type="sphere", center=[0, 0, 0], radius=outer - wall, op="subtract"),
        dict(type="half_space", normal=[0, 0, 1], offset=rim_z, op="intersect"),
        dict(type="cylinder", center=[0, 0, -outer * 0.93], radius=foot_r, half_height=0.008, rounding=0.002),
    ]


def camera(rng):
    depth = _u(rng, 0.035, 0.05)   # x
    height = _u(rng, 0.065, 0.085)  # y
    width = _u(rng, 0.10, 0.14)    # z
    lens_r = _u(rng, 0.018, 0.026)
    lens_len = _u(rng, 0.02, 0.04)
    lens_z = _u(rng, -0.25, 0.25) * width
    bump = [_u(rng, 0.012, 0.02), _u(rng, 0.008, 0.012), _u(rng, 0.015, 0.025)]
    return [
        dict(type="round_box", center=[0, 0, 0], half=[depth / 2, height / 2, width / 2], rounding=0.006),
        dict(type="cylinder", center=[depth / 2 + lens_len / 2 - 0.002, 0, lens_z], radius=lens_r,
             half_height=lens_len / 2, axis="x", rounding=0.002),
        dict(type="round_box", center=[0, height / 2 + bump[1] - 0.002, -lens_z * 0.5], half=bump, rounding=0.003),
    ]


def can(rng):
    r = _u(rng, 0.03, 0.04)
    h = _u(rng, 0.09, 0.12)
    return [
        dict(type="cylinder", center=[0, 0, 0], radius=r, half_height=h / 2, rounding=0.004),
        dict(type="cylinder", center=[0, 0, h / 2], radius=r - 0.004, half_height=0.004, op="subtract"),
    ]


def cellphone(rng):
    width = _u(rng, 0.07, 0.08)
    thick = _u(rng, 0.007, 0.011)
    length = _u(rng, 0.125, 0.16)
    return [
        dict(type="round_box", center=[0, 0, 0], half=[width / 2, thick / 2, length / 2], rounding=thick * 0.45),
        dict(type="round_box", center=[width * 0.25, -thick / 2, length * 0.35],
             half=[0.012, 0.0015, 0.012], rounding=0.001),
    ]


def jar(rng):
    r = _u(rng, 0.04, 0.06)
    h = _u(rng, 0.07, 0.11)
    lid_r = r * _u(rng, 0.8, 0.95)
    lid_h = _u(rng, 0.015, 0.025)
    return [
        dict(type="cylinder", center=[0, 0, 0], radius=r, half_height=h / 2, rounding=_u(rng, 0.01, 0.018)),
        dict(type="cylinder", center=[0, 0, h / 2 + lid_h / 2 - 0.003], radius=lid_r, half_height=lid_h / 2,
             rounding=0.002),
    ]


def knife(rng):
    handle_len = _u(rng, 0.08, 0.11)
    handle_w = _u(rng, 0.02, 0.025)
    handle_t = _u(rng, 0.012, 0.014)
    blade_len = _u(rng, 0.10, 0.14)
    blade_w = _u(rng, 0.018, 0.03)
    blade_t = _u(rng, 0.002, 0.003)
    tip_angle = math.radians(_u(rng, 15.0, 30.0))
    blade_top = handle_len + blade_len
    # The tip: a plane through the blade's top corner, slanted by tip_angle, keeps the lower part.
    normal = [math.sin(tip_angle), 0.0, math.cos(tip_angle)]
    corner = np.array([-blade_w / 2, 0.0, blade_top])
    return [
        dict(type="round_box", center=[0, 0, handle_len + blade_len / 2],
             half=[blade_w / 2, blade_t / 2, blade_len / 2], rounding=0.0009),
        dict(type="half_space", normal=normal, offset=float(np.dot(normal, corner)), op="intersect"),
        dict(type="round_box", center=[0, 0, handle_len / 2], half=[handle_w / 2, handle_t / 2, handle_len / 2],
             rounding=0.005),
    ]


def remote(rng):
    width = _u(rng, 0.04, 0.05)
    thick = _u(rng, 0.018, 0.025)
    length = _u(rng, 0.15, 0.2)
    shape = [dict(type="round_box", center=[0, 0, 0], half=[width / 2, thick / 2, length / 2],
                  rounding=_u(rng, 0.006, 0.008))]
    rows = int(rng.integers(2, 4))
    for i in range(rows):
        z = length * (0.3 - 0.15 * i)
        for x in (-width * 0.22, width * 0.22):
            shape.append(dict(type="cylinder", center=[x, thick / 2, z], radius=0.005, half_height=0.002, axis="y"))
    return shape


FAMILIES = {
    "bottle": bottle, "bowl": bowl, "camera": camera, "can": can,
    "cellphone": cellphone, "jar": jar, "knife": knife, "remote": remote,
}
# Where along z (as a fraction of the half height) the hand grips: a knife is held by its handle.
GRIP_RANGE = {"knife": (-0.75, -0.35)}


# mesh_shape's values are exact within this many cell diagonals of the surface: every corner of a
# cell the surface crosses is within one
EXACT_DIAGONALS = 2


def mesh_grid(shape: list[dict], cell: float, min_samples: int = 32) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The box and the samples per axis of the grid ``mesh_shape`` samples: ``cell`` apart, but at
    least ``min_samples`` across each axis (so a 2 mm knife blade is never missed)."""
    lo, hi = sdf.conservative_bounds(shape)
    lo, hi = lo - 2 * cell, hi + 2 * cell
    return lo, hi, tuple(int(max(min_samples, np.ceil((hi[i] - lo[i]) / cell) + 1)) for i in range(3))


def mesh_shape(shape: list[dict], cell: float, min_samples: int = 32) -> trimesh.Trimesh:
    """Watertight marching-cubes mesh of a shape on its ``mesh_grid``."""
    lo, hi, counts = mesh_grid(shape, cell, min_samples)
    axes, spacing = meshing.grid_axes(lo, hi, counts)
    values = sdf.evaluate_grid(shape, axes, exact_within=EXACT_DIAGONALS * float(np.linalg.norm(spacing)))
    return meshing.mesh_from_sdf_grid(values, lo, spacing)


def translate(shape: list[dict], offset) -> list[dict]:
    """The same shape moved by ``offset`` (every position-like parameter shifts)."""
    offset = np.asarray(offset, dtype=float)
    out = []
    for prim in shape:
        p = dict(prim)
        for key in ("center", "a", "b"):
            if key in p:
                p[key] = (np.asarray(p[key], dtype=float) + offset).tolist()
        if p["type"] == "half_space":
            p["offset"] = float(p["offset"] + np.dot(p["normal"], offset))
        out.append(p)
    return out


def make_object(category: str, rng: np.random.Generator, cell: float) -> tuple[list[dict], trimesh.Trimesh]:
    """A random member of ``category``'s family and its mesh, both with the mesh's bounding box
    centred at the origin."""
    shape = FAMILIES[category](rng)
    mesh = mesh_shape(shape, cell)
    center = mesh.bounds.mean(axis=0)
    mesh.apply_translation(-center)
    return translate(shape, -center), mesh


def make_hand(category: str, half_extent: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """A grasping hand around the object's z axis: palm on one side, four fingers and a thumb
    curling round the object, and the start of the forearm. ``half_extent`` is the object's
    bounding half size; the grasp direction, height, tightness and hand size are random."""
    s = _u(rng, 0.85, 1.15)
    palm_t, palm_len, palm_w = 0.025 * s, _u(rng, 0.085, 0.1) * s, _u(rng, 0.075, 0.09) * s
    finger_r, gap = _u(rng, 0.008, 0.0095) * s, 0.002
    phi = _u(rng, 0.0, 2 * math.pi)
    u = np.array([math.cos(phi), math.sin(phi), 0.0])   # from the palm towards the object
    v = np.array([-u[1], u[0], 0.0])                    # along the palm, towards the knuckles
    ex, ey, ez = (float(x) for x in half_extent)
    lo, hi = GRIP_RANGE.get(category, (-0.45, 0.45))
    zh = _u(rng, lo, hi) * ez

    # Radius of the object's footprint ellipse in direction -u (the palm side).
    r_palm = 1.0 / math.sqrt((u[0] / ex) ** 2 + (u[1] / ey) ** 2)
    palm_center = -u * (r_palm + gap + palm_t / 2) + np.array([0.0, 0.0, zh])
    palm_rot = np.stack([u, v, np.array([0.0, 0.0, 1.0])], axis=1)
    shape = [dict(type="round_box", center=palm_center.tolist(), half=[palm_t / 2, palm_len / 2, palm_w / 2],
                  rounding=0.009 * s, rotation=palm_rot.tolist())]
    wrist = palm_center - v * palm_len / 2
    shape.append(dict(type="capsule", a=wrist.tolist(), b=(wrist - v * 0.035 - u * 0.01).tolist(),
                      radius=0.022 * s))

    a_f, b_f = ex + finger_r + gap, ey + finger_r + gap

    def arc_point(beta: float, z: float) -> list[float]:
        return [a_f * math.cos(beta), b_f * math.sin(beta), z]

    beta_palm = math.atan2(-u[1], -u[0])
    beta_knuckle = beta_palm - math.atan2(palm_len / 2, r_palm + palm_t)
    curl = _u(rng, 60.0, 220.0)
    spacing = palm_w / 4
    for i in range(4):
        z = zh + (i - 1.5) * spacing
        knuckle = palm_center + v * (palm_len / 2 - 0.01 * s) + np.array([0.0, 0.0, (i - 1.5) * spacing])
        bend = math.radians(curl * _u(rng, 0.8, 1.1) * (0.8 if i in (0, 3) else 1.0))
        betas = [beta_knuckle - bend * t for t in (0.0, 0.4, 0.75, 1.0)]
        points = [knuckle.tolist()] + [arc_point(b, z) for b in betas[1:]]
        for a, b in zip(points[:-1], points[1:]):
            shape.append(dict(type="capsule", a=a, b=b, radius=finger_r * (1.0 if i in (1, 2) else 0.9)))
    # Thumb: from the wrist side of the palm, curling the other way.
    thumb_curl = math.radians(_u(rng, 40.0, 110.0))
    z_t = zh - palm_w * _u(rng, 0.1, 0.45)
    base = palm_center - v * (palm_len * 0.3) + u * (palm_t / 2)
    betas = [beta_palm + math.atan2(palm_len * 0.3, r_palm) + thumb_curl * t for t in (0.5, 1.0)]
    points = [base.tolist()] + [arc_point(b, z_t) for b in betas]
    for a, b in zip(points[:-1], points[1:]):
        shape.append(dict(type="capsule", a=a, b=b, radius=finger_r * 1.15))
    return shape
