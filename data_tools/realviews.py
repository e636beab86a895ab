"""What the real-data converters (``data_tools.obman``, ``data_tools.dexycb_root``) share: the
per-view masks and depth they write, the occlusion ratio, the object-model entry and the end of
a conversion.

Files are SynthOcc's formats, so every reader takes real and synthetic views alike:

- mask: 8-bit grayscale PNG, 255 inside, 0 outside;
- depth: 16-bit grayscale PNG of the camera z (OpenCV axes), value / ``DEPTH_SCALE`` = metres, 0
  where there is no depth. A depth past the 16-bit range (6.5535 m) is stored as 0, unknown,
  rather than clipped to a wrong distance.

Each file is written through a temporary file and renamed, and a file already there that decodes
whole at the view's size is kept: a conversion stopped half way resumes where it stopped.

An object model entry names a 3D model and where it sits, for the reconstruction's targets and
metrics: ``{"root": NAME, "path": PATH, "to_world": 4x4}``, PATH relative to the folder that
``dataset.json["model_roots"][NAME]`` names (null when that folder was not given), ``to_world``
mapping the model's coordinates (metres) to the world of the view's ``world_to_cam``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import trimesh
from PIL import Image

from data_tools.synthocc import DEPTH_SCALE
from occmllm import fileio
from occmllm.dataset import homogeneous, write_dataset
from occmllm.errors import OccError


def mask_image(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask, dtype=bool).astype(np.uint8) * 255


def depth_image(metres: np.ndarray) -> np.ndarray:
    """Camera z in metres (0 or non-finite: none) -> the project's 16-bit depth values."""
    value = np.nan_to_num(np.asarray(metres, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0) * DEPTH_SCALE
    value = np.round(value)
    return np.where((value > 0) & (value <= 65535), value, 0).astype(np.uint16)


def occlusion_ratio(visible: np.ndarray, amodal: np.ndarray) -> float | None:
    """Fraction of the amodal silhouette the image does not show (visible pixels outside it are
    ignored); None for an empty amodal silhouette, which cannot say."""
    n_amodal = int(amodal.sum())
    if n_amodal == 0:
        return None
    return round(1.0 - int((visible & amodal).sum()) / n_amodal, 6)


def load_model(path: Path, context: str) -> trimesh.Trimesh:
    """A 3D model file as one triangle mesh in its own coordinates (materials are not read)."""
    try:
        mesh = trimesh.load(path, force="mesh", process=False, skip_materials=True)
    except Exception as exc:  # loaders raise many types for a damaged file
        raise OccError(f"{context}: cannot read the 3D model ({type(exc).__name__}: {exc}); re-extract it") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise OccError(f"{context}: the 3D model has no triangles; re-extract it")
    return mesh


def model_entry(root: str, path: str, to_world, context: str) -> dict:
    return {"root": root, "path": path, "to_world": homogeneous(to_world, context, "object pose")}


def _complete(path: Path, size: tuple[int, int]) -> bool:
    """Whether ``path`` is an image that decodes whole at ``size`` (width, height)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == size
    except Exception:  # any damage means: write it again
        return False


class ViewWriter:
    """Writes the per-view files of one conversion under ``out``, keeping complete ones."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.written = self.kept = 0

    def write(self, rel: str, size: tuple[int, int], make: Callable[[], np.ndarray]) -> str:
        """Write ``make()`` as the PNG ``out/rel`` unless a complete one is there; returns ``rel``.
        ``make`` runs only when the file is written, so a resumed run skips the decoding too."""
        path = fileio.resolve_in_root(self.out, rel, str(self.out))
        if _complete(path, size):
            self.kept += 1
            return rel
        array = make()
        with fileio.atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
        self.written += 1
        return rel


def finish(out: Path, records: list[dict], name: str, root: Path, **extra) -> dict:
    """Write the manifest and ``dataset.json`` (with the depth scale) once every view converted."""
    return write_dataset(Path(out), records, name, root, depth_scale=DEPTH_SCALE, **extra)
