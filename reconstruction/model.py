"""The MOHO-style reconstruction network: an image-conditioned signed distance field with colour.

For a query point p (camera frame, metres) the decoder reads
  - pixel-aligned local features: the encoder's feature maps sampled where p projects;
  - a global feature: the last feature map averaged over the hand-and-object region and overall;
  - p's position in the reconstruction cube (raw and Fourier-encoded);
  - cues at p's pixel: visible-object mask, hand mask, the object's colour there, how far p lies behind the
    observed surface (points in front of it are empty space);
  - hand features: the offset from p to the nearest hand point (from the hand mask and depth
    here; MANO joints or vertices would serve the same way), as MOHO conditions on the hand;
and outputs the signed distance (metres, negative inside) and an RGB colour.

The image encoder is a transformers backbone (ResNet, ConvNeXt or DINOv2 config), randomly
initialised, or pretrained from a local folder. Checkpoints are folders: ``config.json`` +
``model.safetensors``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from occmllm import fileio
from occmllm.errors import OccError
from reconstruction.views import CUBE_HALF, ViewInput, cube_centre, hand_points

MODEL_TYPE = "occ_recon_sdf"
PIXEL_MEAN, PIXEL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HAND_FEATURE_POINTS = 64
DEPTH_CUE_SCALE = 0.05  # m: "behind the observed surface" is measured in these units, clipped to +-3


@dataclass
class ReconConfig:
    """The architecture; every field is also a training flag."""
    backbone: str = field(default="resnet", metadata={"help": "resnet | convnext | dinov2"})
    backbone_path: str | None = field(default=None, metadata={
        "help": "a local pretrained backbone folder (e.g. a microsoft/resnet-18 download)"})
    widths: list[int] = field(default_factory=lambda: [32, 64, 128], metadata={"help": "channels per stage"})
    local_width: int = field(default=32, metadata={"help": "channels per feature map after a 1x1 projection"})
    global_width: int = 64
    hidden: int = 128
    layers: int = 4
    fourier: int = field(default=4, metadata={"help": "Fourier bands; more made ridged surfaces at demo length"})


def _backbone_config(cfg: ReconConfig):
    from transformers import ConvNextConfig, Dinov2Config, ResNetConfig
    stages = [f"stage{i + 1}" for i in range(len(cfg.widths))]
    if cfg.backbone == "resnet":
        return ResNetConfig(embedding_size=cfg.widths[0], hidden_sizes=cfg.widths, depths=[1] * len(cfg.widths),
                            layer_type="basic", out_features=stages)
    if cfg.backbone == "convnext":
        return ConvNextConfig(hidden_sizes=cfg.widths, depths=[1] * len(cfg.widths), num_stages=len(cfg.widths),
                              out_features=stages)
    if cfg.backbone == "dinov2":
        return Dinov2Config(hidden_size=cfg.widths[-1], num_hidden_layers=len(cfg.widths), num_attention_heads=4,
                            intermediate_size=2 * cfg.widths[-1], patch_size=8, image_size=224, out_features=stages)
    raise OccError(f"backbone {cfg.backbone!r}: expected resnet, convnext or dinov2")


def build_backbone(cfg: ReconConfig, saved_config: dict | None = None) -> nn.Module:
    """A new backbone for ``cfg``, or, with ``saved_config``, the architecture of a saved one
    (its weights then come from the checkpoint's state dict)."""
    from transformers import AutoBackbone, AutoConfig
    if saved_config is not None:
        config = dict(saved_config)
        return AutoBackbone.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    if cfg.backbone_path:
        if not Path(cfg.backbone_path, "config.json").is_file():
            raise OccError(f"backbone_path {cfg.backbone_path}: not a Hugging Face model folder (no config.json)")
        model = AutoBackbone.from_pretrained(cfg.backbone_path, use_safetensors=True)
    else:
        model = AutoBackbone.from_config(_backbone_config(cfg))
    return model


def fourier(x: torch.Tensor, bands: int) -> torch.Tensor:
    """sin/cos of x at frequencies 2^k * pi, k < bands: (..., 3) -> (..., 6 * bands)."""
    freqs = (2.0 ** torch.arange(bands, device=x.device, dtype=x.dtype)) * math.pi
    angles = x[..., None] * freqs  # (..., 3, bands)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


@dataclass
class Encoded:
    """One batch of views after the encoder: everything a query needs besides the points."""
    feature_maps: list[torch.Tensor]  # per stage (B, C_s, H_s, W_s)
    global_feature: torch.Tensor      # (B, G)
    cue_maps: torch.Tensor            # (B, 6, H, W): visible mask, hand mask, depth (m), visible object's RGB
    intrinsics: torch.Tensor          # (B, 3, 3)
    centre: torch.Tensor              # (B, 3) cube centre, camera frame
    hand: torch.Tensor                # (B, P, 3) hand points, camera frame
    hand_valid: torch.Tensor          # (B, P) bool
    size: tuple[int, int]             # (H, W)


class SDFReconstructor(nn.Module):
    def __init__(self, cfg: ReconConfig, backbone_config: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, backbone_config)
        with torch.no_grad():  # feature widths, measured rather than assumed per backbone type
            maps = self.backbone(torch.zeros(1, 3, 64, 64)).feature_maps
        channels = [m.shape[1] for m in maps]
        # narrow every map (1x1 conv) and the global vector before they are repeated per point:
        # the per-point MLP is where the time goes
        self.local_proj = nn.ModuleList(nn.Conv2d(c, cfg.local_width, 1) for c in channels)
        self.global_proj = nn.Linear(2 * channels[-1], cfg.global_width)
        local, glob = cfg.local_width * len(channels), cfg.global_width
        position = 3 + 6 * cfg.fourier
        self.input_dim = local + glob + position + 6 + 4
        dims = [self.input_dim] + [cfg.hidden] * cfg.layers
        self.layers = nn.ModuleList(nn.Linear(dims[i] + (self.input_dim if i == cfg.layers // 2 else 0), dims[i + 1])
                                    for i in range(cfg.layers))
        self.sdf_head = nn.Linear(cfg.hidden, 1)
        self.colour_head = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden // 2), nn.Softplus(beta=10),
                                         nn.Linear(cfg.hidden // 2, 3))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    # -- encoder -----------------------------------------------------------------------------------
    def encode(self, batch: dict) -> Encoded:
        rgb = batch["rgb"]  # (B, 3, H, W) in [0, 1]
        maps = self.backbone((rgb - self.pixel_mean) / self.pixel_std).feature_maps
        last = maps[-1]
        region = (batch["cues"][:, :2].amax(dim=1, keepdim=True) > 0.5).float()  # object or hand
        weight = F.adaptive_avg_pool2d(region, last.shape[-2:])
        masked = (last * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1e-6)
        glob = self.global_proj(torch.cat([masked, last.mean((2, 3))], dim=1))
        maps = [proj(m) for proj, m in zip(self.local_proj, maps)]
        # the colour cue is the object's own pixels only: copying a hand pixel would paint the hand
        # onto the hidden part of the object
        object_rgb = rgb * batch["cues"][:, :1]
        return Encoded(maps, glob, torch.cat([batch["cues"], object_rgb], dim=1), batch["intrinsics"], batch["centre"], batch["hand"],
                       batch["hand_valid"], tuple(rgb.shape[-2:]))

    # -- decoder -----------------------------------------------------------------------------------
    def point_features(self, enc: Encoded, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) camera-frame points -> (B, N, input_dim): local features, the global feature, the rest."""
        local, rest = self._per_point(enc, points)
        glob = enc.global_feature[:, None].expand(-1, points.shape[1], -1)
        return torch.cat(local + [glob] + rest, dim=-1)

    def _per_point(self, enc: Encoded, points: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The inputs that vary from point to point, as pieces to concatenate: (local features, the
        inputs after the global feature)."""
        h, w = enc.size
        z = points[..., 2:3].clamp_min(1e-3)
        uv = torch.einsum("bij,bnj->bni", enc.intrinsics, points)[..., :2] / z  # pixels
        grid = torch.stack([uv[..., 0] / w * 2 - 1, uv[..., 1] / h * 2 - 1], dim=-1)
        # points behind the camera see nothing; huge coordinates also crash grid_sample's CPU backward
        grid = torch.where(points[..., 2:3] > 1e-3, grid, torch.full_like(grid, 2.0)).clamp(-2, 2)[:, :, None]
        local = [F.grid_sample(m, grid, align_corners=False).squeeze(-1).transpose(1, 2)  # (B, N, C) each
                 for m in enc.feature_maps]
        cues = F.grid_sample(enc.cue_maps, grid, mode="nearest", align_corners=False).squeeze(-1).transpose(1, 2)
        observed = cues[..., 2:3]
        behind = torch.where(observed > 0, ((z - observed) / DEPTH_CUE_SCALE).clamp(-3, 3), torch.full_like(z, -3.0))
        rel = (points - enc.centre[:, None]) / CUBE_HALF
        dist = torch.cdist(points, enc.hand)  # (B, N, P)
        dist = dist.masked_fill(~enc.hand_valid[:, None], 1e3)
        nearest = dist.argmin(dim=-1, keepdim=True)  # (B, N, 1)
        hand_point = torch.gather(enc.hand, 1, nearest.expand(-1, -1, 3))
        has_hand = enc.hand_valid.any(dim=1)[:, None, None].to(points.dtype)
        hand_offset = (hand_point - points) / CUBE_HALF * has_hand
        hand_dist = hand_offset.norm(dim=-1, keepdim=True)
        # the pixel's own colour: visible surface points can take it as it is
        return local, [rel, fourier(rel, self.cfg.fourier), cues[..., :2], behind, cues[..., 3:6], hand_offset,
                       hand_dist]

    def decode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features
        for i, layer in enumerate(self.layers):
            if i == self.cfg.layers // 2:
                x = torch.cat([x, features], dim=-1)
            x = F.softplus(layer(x), beta=10)
        sdf = self.sdf_head(x).squeeze(-1) * CUBE_HALF  # metres
        return sdf, torch.sigmoid(self.colour_head(x))

    def query(self, enc: Encoded, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed distance (B, N) in metres and colour (B, N, 3) in [0, 1] at camera-frame points."""
        return self.decode(self.point_features(enc, points))

    def sdf(self, enc: Encoded, points: torch.Tensor) -> torch.Tensor:
        """``query``'s signed distance alone, for mesh extraction, with less work per point: no
        colour head; the global feature, the same for every point of a view, enters as a per-view
        bias instead of being repeated per point; the skip connection adds a second matrix product
        instead of concatenating. Equal to ``query`` up to float rounding (sums in another order)."""
        local, rest = self._per_point(enc, points)
        per_point = torch.cat(local + rest, dim=-1)
        return torch.stack([self._sdf_of_view(per_point[b], enc.global_feature[b]) for b in range(len(points))])

    def _sdf_of_view(self, per_point: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        """``sdf`` for one view: (N, input_dim - G) point inputs without the global feature (G,) -> (N,)."""
        start = self.cfg.local_width * len(self.local_proj)  # the global feature's columns: start to end
        end, width = start + len(glob), self.input_dim
        x = None
        for i, layer in enumerate(self.layers):
            skip = i == self.cfg.layers // 2
            hidden = 0 if i == 0 else layer.in_features - width * skip  # the hidden state's columns come first
            copies = (i == 0) + skip  # how many times the features follow (twice when layer 0 is the skip layer)
            if copies:
                w = sum(layer.weight[:, hidden + k * width: hidden + (k + 1) * width] for k in range(copies))
                per_point_w = torch.cat([w[:, :start], w[:, end:]], dim=1)
                y = torch.addmm(layer.bias + w[:, start:end] @ glob, per_point, per_point_w.T)
                if hidden:
                    y.addmm_(x, layer.weight[:, :hidden].T)
            else:
                y = F.linear(x, layer.weight, layer.bias)
            x = F.softplus(y, beta=10)
        return self.sdf_head(x).squeeze(-1) * CUBE_HALF

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, **asdict(self.cfg),
                                                       "backbone_config": self.backbone.config.to_dict()}, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))


def load_reconstructor(folder: str | Path, device: str | torch.device = "cpu") -> SDFReconstructor:
    from safetensors.torch import load_file
    folder = Path(folder)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise OccError(f"{folder}: reconstruction checkpoint not found; train one with `python -m reconstruction.train`")
    if not config_file.is_file() or not (folder / "model.safetensors").is_file():
        raise OccError(f"{folder}: not a reconstruction checkpoint (needs config.json and model.safetensors)")
    config = fileio.read_json(config_file)
    if not isinstance(config, dict) or config.pop("model_type", None) != MODEL_TYPE:
        raise OccError(f"{folder}: config.json is not a reconstruction model's (model_type {MODEL_TYPE!r} expected)")
    backbone_config = config.pop("backbone_config", None)
    model = SDFReconstructor(ReconConfig(**config), backbone_config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval()


# --- from views to a batch ------------------------------------------------------------------------

def view_batch(views: list[ViewInput], device: str | torch.device = "cpu") -> dict:
    """Stack views into the tensors ``encode`` reads (all views must share one image size)."""
    sizes = {v.size for v in views}
    if len(sizes) != 1:
        raise OccError(f"views of different sizes in one batch: {sorted(sizes)}")
    # contiguous: a channels-last input crashes the CPU convolution backward of this torch build
    rgb = torch.from_numpy(np.stack([v.rgb for v in views])).permute(0, 3, 1, 2).contiguous().float() / 255.0
    cues = torch.from_numpy(np.stack([np.stack([v.visible, v.hand, v.depth]).astype(np.float32) for v in views]))
    hand = np.zeros((len(views), HAND_FEATURE_POINTS, 3), dtype=np.float32)
    valid = np.zeros((len(views), HAND_FEATURE_POINTS), dtype=bool)
    for i, v in enumerate(views):
        pts = hand_points(v, HAND_FEATURE_POINTS)
        hand[i, : len(pts)], valid[i, : len(pts)] = pts, True
    out = {
        "rgb": rgb, "cues": cues,
        "intrinsics": torch.from_numpy(np.stack([v.camera.intrinsics for v in views]).astype(np.float32)),
        "centre": torch.from_numpy(np.stack([cube_centre(v) for v in views]).astype(np.float32)),
        "hand": torch.from_numpy(hand), "hand_valid": torch.from_numpy(valid),
    }
    return {k: t.to(device) for k, t in out.items()}
