"""Train the reconstruction model on a dataset folder: SynthOcc, or ObMan/DexYCB converted by data_tools (CPU or GPU).

    python -m reconstruction.train [--config reconstruction/config.yaml] [--flag value ...]

Loss per view (weights are flags):
  sdf         L1 between predicted and exact signed distance, both clipped to +-5 cm, in cm;
  eikonal     (|grad sdf| - 1)^2 by finite differences at a subset of the SDF points;
  silhouette  binary cross-entropy between the SDF's soft silhouette along rays of another view
              and that view's visible-object mask, ignoring pixels the hand covers (MOHO's
              occlusion-aware multi-view supervision);
  colour      L1 between the colour head and the hand-free image at surface points.
Every ``save_steps`` the model, optimizer and step go to OUTPUT_DIR.partial/, and a run started
again resumes from there; the final model is OUTPUT_DIR itself (config.json + model.safetensors),
with train_log.jsonl (the losses every log_steps) and training.png (each against the step).
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from occmllm import curves, fileio
from occmllm.config import parse_config
from occmllm.dataset import load_dataset
from occmllm.errors import OccError, cli
from reconstruction.model import ReconConfig, SDFReconstructor, load_reconstructor, view_batch
from reconstruction.supervision import TrainingViews

SDF_CLIP = 0.05          # m
EIKONAL_STEP = 0.002     # m, finite-difference step
SILHOUETTE_SHARPNESS = 0.003  # m: occupancy = sigmoid(-sdf / this)


@dataclass
class ReconTrainArguments:
    data: str = field(default="outputs/demo/data", metadata={"help": "dataset folder (SynthOcc or converted)"})
    output_dir: str = field(default="outputs/demo/recon/model", metadata={"help": "where the model is written"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from this reconstruction model's weights and architecture (e.g. the shipped "
                "occmllm/pretrained/recon-synthocc); the architecture flags are then ignored"})
    split: str = "train"
    max_scenes: int | None = field(default=None, metadata={"help": "only the first N scenes of the split"})
    steps: int = 2400
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    sdf_points: int = 1024
    eikonal_points: int = 128
    colour_points: int = 256
    silhouette_rays: int = 64
    ray_samples: int = 16
    weight_sdf: float = 1.0
    weight_eikonal: float = 0.1
    weight_silhouette: float = 0.5
    weight_colour: float = 0.5
    save_steps: int = 250
    log_steps: int = 50
    resume: bool = field(default=True, metadata={"help": "continue from OUTPUT_DIR.partial if it exists"})
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def collate(items: list[dict], device) -> dict:
    batch = view_batch([it["view"] for it in items], device)
    for key in ("sdf_points", "sdf", "colour_points", "colour", "ray_points", "silhouette", "silhouette_weight",
                "colour_weight"):
        batch[key] = torch.from_numpy(np.stack([np.asarray(it[key]) for it in items])).to(device)
    return batch


def losses(model: SDFReconstructor, batch: dict, args: ReconTrainArguments) -> dict[str, torch.Tensor]:
    enc = model.encode(batch)
    b = batch["sdf_points"].shape[0]
    rays = batch["ray_points"]  # (B, R, S, 3)
    r, s = rays.shape[1:3]
    eik = batch["sdf_points"][:, : args.eikonal_points]
    steps = torch.eye(3, device=eik.device) * EIKONAL_STEP
    shifted = (eik[:, :, None] + steps).reshape(b, -1, 3)  # each point moved along x, y, z
    # one decoder pass over every point of the step
    groups = [batch["sdf_points"], shifted, batch["colour_points"], rays.reshape(b, r * s, 3)]
    sdf, colour = model.query(enc, torch.cat(groups, dim=1))
    sizes = [g.shape[1] for g in groups]
    sdf_pts, sdf_shift, sdf_col, sdf_ray = torch.split(sdf, sizes, dim=1)
    _, _, colour_col, _ = torch.split(colour, sizes, dim=1)

    out = {}
    out["sdf"] = (sdf_pts.clamp(-SDF_CLIP, SDF_CLIP) - batch["sdf"].clamp(-SDF_CLIP, SDF_CLIP)).abs().mean() * 100
    grad = (sdf_shift.reshape(b, -1, 3) - sdf_pts[:, : args.eikonal_points, None]) / EIKONAL_STEP
    out["eikonal"] = ((grad.norm(dim=-1) - 1) ** 2).mean()
    occupancy = torch.sigmoid(-sdf_ray.reshape(b, r, s) / SILHOUETTE_SHARPNESS).amax(dim=-1).clamp(1e-5, 1 - 1e-5)
    bce = F.binary_cross_entropy(occupancy, batch["silhouette"], reduction="none")
    out["silhouette"] = (bce * batch["silhouette_weight"]).sum() / batch["silhouette_weight"].sum().clamp_min(1)
    col = (colour_col - batch["colour"]).abs().mean(dim=(1, 2))
    out["colour"] = (col * batch["colour_weight"]).sum() / batch["colour_weight"].sum().clamp_min(1)
    out["total"] = (args.weight_sdf * out["sdf"] + args.weight_eikonal * out["eikonal"]
                    + args.weight_silhouette * out["silhouette"] + args.weight_colour * out["colour"])
    return out


def _save_last(folder: Path, model, optimizer, scheduler, step: int, rng: np.random.Generator, log: list) -> None:
    with fileio.replace_folder(folder) as tmp:
        model.save(tmp / "model")
        fileio.write_jsonl(tmp / "train_log.jsonl", log)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    torch's large per-step buffers land on the heap between the long-lived cached views and
    banks, and the freed space stays resident: without this, resident memory grows with every step
    on the demo set; a trim every 10 steps holds it at no cost in speed, where a fixed mmap threshold
    slows the steps (benchmarks/RESULTS.md, "Figures behind settings in the code")."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def train(args: ReconTrainArguments, model_args: ReconConfig) -> Path:
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    last = out.with_name(out.name + ".partial")  # resumable state until the run finishes
    dataset = load_dataset(args.data)
    views = TrainingViews(dataset, args.split, args.max_scenes)
    device = torch.device(args.device)
    if args.resume and (last / "model").is_dir():
        model = load_reconstructor(last / "model", device).train()
    elif args.init_from:
        model = load_reconstructor(args.init_from, device).train()
    else:
        model = SDFReconstructor(model_args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)
    # linear warm-up, then cosine decay to zero; a Python float, so the saved state holds no numpy
    # scalar (the resume loads it with torch.load(weights_only=True), which refuses those)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: float(
        min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps))))
    rng = np.random.default_rng(args.seed)
    start = 0
    if args.resume and (last / "trainer_state.pt").is_file():
        state = torch.load(last / "trainer_state.pt", weights_only=True)  # tensors and plain data only: no pickle code
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        print(f"resuming from {last} at step {start}")

    log = [e for _, e in fileio.iter_jsonl(last / "train_log.jsonl")] if start else []
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="reconstruction", unit="step",
               disable=not args.progress)
    t0, running = time.time(), {}
    model.train()
    for step in bar:
        idx = rng.integers(0, len(views), args.batch_size)
        items = [views.item(int(i), rng, args.sdf_points, args.colour_points, args.silhouette_rays, args.ray_samples)
                 for i in idx]
        parts = losses(model, collate(items, device), args)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 10 == 0:
            release_free_memory()
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % args.log_steps == 0 or step + 1 == args.steps:
            n = (step + 1 - start) % args.log_steps or args.log_steps
            entry = {"step": step + 1, **{k: round(v / n, 5) for k, v in running.items()},
                     "seconds": round(time.time() - t0, 1),
                     "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
            log.append(entry)
            running = {}
            bar.set_postfix(sdf_cm=entry["sdf"], sil=entry["silhouette"])
            if not args.progress:
                print(json.dumps(entry), flush=True)
        if (step + 1) % args.save_steps == 0 and step + 1 < args.steps:
            _save_last(last, model, optimizer, scheduler, step + 1, rng, log)
    bar.close()

    with fileio.replace_folder(out) as tmp:  # the final model replaces the folder whole
        model.eval().save(tmp)
        curves.save_training_log(log, tmp, f"reconstruction model, {args.steps} steps")
        fileio.write_json(tmp / "train_args.json", {**asdict(args), **asdict(model.cfg)})
    shutil.rmtree(last, ignore_errors=True)
    return out


@cli
def main(argv=None) -> int:
    args, model_args = parse_config((ReconTrainArguments, ReconConfig), argv,
                                    Path(__file__).with_name("config.yaml"))
    if args.steps < 1 or args.batch_size < 1:
        raise OccError("--steps and --batch_size must be at least 1")
    out = train(args, model_args)
    print(f"saved the reconstruction model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
