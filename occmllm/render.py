"""Pinhole cameras and ray-cast rendering of triangle meshes (trimesh + Embree).

One renderer serves the SynthOcc generator and the 3D-reconstruction renders the model reads.
Conventions (OpenCV): camera x right, y down, z forward; ``world_to_cam`` maps world points to
camera coordinates; depth is the camera z of the first surface hit, 0 where no surface is hit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh


@dataclass(frozen=True)
class Camera:
    intrinsics: np.ndarray    # (3, 3) K
    world_to_cam: np.ndarray  # (4, 4) extrinsics
    width: int
    height: int

    @staticmethod
    def look_at(eye, target, focal: float, width: int, height: int, up=(0.0, 0.0, 1.0)) -> "Camera":
        eye, target, up = (np.asarray(x, dtype=np.float64) for x in (eye, target, up))
        forward = target - eye
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, up)
        if np.linalg.norm(right) < 1e-8:  # looking straight along ``up``
            right = np.cross(forward, [1.0, 0.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        rotation = np.stack([right, down, forward])
        extrinsics = np.eye(4)
        extrinsics[:3, :3] = rotation
        extrinsics[:3, 3] = -rotation @ eye
        intrinsics = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
        return Camera(intrinsics, extrinsics, width, height)

    @staticmethod
    def from_lists(intrinsics, world_to_cam, width: int, height: int) -> "Camera":
        return Camera(np.asarray(intrinsics, dtype=np.float64), np.asarray(world_to_cam, dtype=np.float64),
                      int(width), int(height))

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates."""
        r, t = self.world_to_cam[:3, :3], self.world_to_cam[:3, 3]
        return -r.T @ t

    def ray_directions(self) -> np.ndarray:
        """(H*W, 3) world-space directions through pixel centres, scaled so camera z = 1."""
        u, v = np.meshgrid(np.arange(self.width) + 0.5, np.arange(self.height) + 0.5)
        pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
        dirs_cam = pix @ np.linalg.inv(self.intrinsics).T
        return dirs_cam @ self.world_to_cam[:3, :3]  # R^T d, row-wise

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points -> (pixel coordinates (N, 2), camera depth (N,))."""
        cam = points @ self.world_to_cam[:3, :3].T + self.world_to_cam[:3, 3]
        pix = cam @ self.intrinsics.T
        return pix[:, :2] / pix[:, 2:3], cam[:, 2]


@dataclass
class Hits:
    """First hits of a camera's rays, flattened in row-major pixel order."""
    label: np.ndarray     # (H*W,) int: index of the mesh hit, -1 for none
    depth: np.ndarray     # (H*W,) float camera z, 0 for none
    location: np.ndarray  # (H*W, 3) world hit point (undefined where label == -1)
    normal: np.ndarray    # (H*W, 3) unit normal facing the camera (undefined where label == -1)
    face: np.ndarray      # (H*W,) face index within the hit mesh, -1 for none


class RayCaster:
    """First-hit ray casting against a fixed list of meshes, labelled by their position."""

    def __init__(self, meshes: list[trimesh.Trimesh]):
        nonempty = [m for m in meshes if len(m.faces)]
        self.meshes = meshes
        counts = np.array([len(m.faces) for m in meshes])
        self._face_offset = np.concatenate([[0], np.cumsum(counts)])
        self._empty = not nonempty
        if not self._empty:
            combined = trimesh.util.concatenate(nonempty)
            self._normals = combined.face_normals
            # The Embree-backed intersector: without embreex trimesh falls back to a pure-Python
            # BVH that takes seconds a view, so its absence is an install error, not a slow path.
            from trimesh.ray.ray_pyembree import RayMeshIntersector
            self._intersector = RayMeshIntersector(combined)

    def cast(self, origin: np.ndarray, directions: np.ndarray, world_to_cam: np.ndarray) -> Hits:
        n = len(directions)
        label = np.full(n, -1, dtype=np.int64)
        face = np.full(n, -1, dtype=np.int64)
        depth = np.zeros(n)
        location = np.zeros((n, 3))
        normal = np.zeros((n, 3))
        if self._empty or n == 0:
            return Hits(label, depth, location, normal, face)
        origins = np.broadcast_to(np.asarray(origin, dtype=np.float64), directions.shape)
        tri, ray, loc = self._intersector.intersects_id(
            origins, directions, multiple_hits=False, return_locations=True)
        mesh_index = np.searchsorted(self._face_offset, tri, side="right") - 1
        label[ray] = mesh_index
        face[ray] = tri - self._face_offset[mesh_index]
        location[ray] = loc
        depth[ray] = loc @ world_to_cam[2, :3] + world_to_cam[2, 3]
        nrm = self._normals[tri]
        flip = np.einsum("ij,ij->i", nrm, directions[ray]) > 0
        nrm[flip] *= -1.0
        normal[ray] = nrm
        return Hits(label, depth, location, normal, face)

    def render(self, camera: Camera, pixel_mask: np.ndarray | None = None) -> Hits:
        """Cast the camera's rays (only those where ``pixel_mask`` is set, if given)."""
        dirs = camera.ray_directions()
        if pixel_mask is None:
            return self.cast(camera.center, dirs, camera.world_to_cam)
        idx = np.flatnonzero(pixel_mask.ravel())
        sub = self.cast(camera.center, dirs[idx], camera.world_to_cam)
        n = len(dirs)
        full = Hits(np.full(n, -1), np.zeros(n), np.zeros((n, 3)), np.zeros((n, 3)), np.full(n, -1))
        full.label[idx], full.depth[idx], full.location[idx] = sub.label, sub.depth, sub.location
        full.normal[idx], full.face[idx] = sub.normal, sub.face
        return full


def lambert(albedo: np.ndarray, normal: np.ndarray, light_dir: np.ndarray, ambient: float = 0.35) -> np.ndarray:
    """Diffuse shading: albedo * (ambient + (1 - ambient) * max(n.l, 0)), values in [0, 1]."""
    light_dir = np.asarray(light_dir, dtype=np.float64)
    light_dir = light_dir / np.linalg.norm(light_dir)
    cos = np.clip(normal @ light_dir, 0.0, 1.0)
    return albedo * (ambient + (1.0 - ambient) * cos)[:, None]


def render_rgb(caster: RayCaster, camera: Camera, colours, background=(0.5, 0.5, 0.5),
               light_cam=(0.3, -0.6, -1.0)) -> np.ndarray:
    """A shaded (H, W, 3) uint8 image of the caster's meshes, mesh ``i`` in ``colours[i]``
    (RGB in [0, 1], one per mesh) under a light given in camera coordinates (default: from the
    upper left, towards the camera side)."""
    hits = caster.render(camera)
    palette = np.array([np.broadcast_to(np.asarray(c, dtype=np.float64), (3,)) for c in colours]).reshape(-1, 3)
    coloured = (hits.label >= 0) & (hits.label < len(palette))
    return _shade_over_background(camera, hits, coloured, palette[hits.label[coloured]], background, light_cam)


def render_vertex_colours(caster: RayCaster, camera: Camera, vertex_colours: np.ndarray,
                          background=(0.5, 0.5, 0.5), light_cam=(0.3, -0.6, -1.0), hits: Hits | None = None) -> np.ndarray:
    """A shaded (H, W, 3) uint8 image of the caster's mesh 0 with per-vertex RGB colours in [0, 1]
    ((V, 3), e.g. colours predicted with a reconstruction), interpolated across each triangle with
    the barycentric coordinates of the hit; lit as in ``render_rgb``. Other meshes occlude it but
    are not drawn (their pixels show the background). ``hits``: ``caster.render(camera)``, where the
    caller has already cast them."""
    mesh = caster.meshes[0]
    vertex_colours = np.asarray(vertex_colours, dtype=np.float64)
    if vertex_colours.shape != (len(mesh.vertices), 3):
        raise ValueError(f"render_vertex_colours: need ({len(mesh.vertices)}, 3) colours, got {vertex_colours.shape}")
    if hits is None:
        hits = caster.render(camera)
    coloured = hits.label == 0
    albedo = np.zeros((int(coloured.sum()), 3))
    if len(albedo):
        faces = mesh.faces[hits.face[coloured]]
        barycentric = trimesh.triangles.points_to_barycentric(mesh.vertices[faces], hits.location[coloured])
        albedo = np.einsum("nk,nkc->nc", barycentric, vertex_colours[faces])
    return _shade_over_background(camera, hits, coloured, np.clip(albedo, 0.0, 1.0), background, light_cam)


def _shade_over_background(camera: Camera, hits: Hits, coloured: np.ndarray, albedo: np.ndarray,
                           background, light_cam) -> np.ndarray:
    """Lambert-shade the ``coloured`` pixels (albedo one row per such pixel) over a flat background."""
    light_world = camera.world_to_cam[:3, :3].T @ np.asarray(light_cam, dtype=np.float64)
    rgb = np.tile(np.asarray(background, dtype=np.float64), (len(hits.label), 1))
    if coloured.any():
        rgb[coloured] = lambert(albedo, hits.normal[coloured], light_world)
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8).reshape(camera.height, camera.width, 3)
