import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures" / "occ-mllm"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models are dominated by thread hand-offs, and one thread is faster and
    immune to busy cores. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A small SynthOcc set shared by the data tests (16 scenes x 4 views)."""
    from data_tools.synthocc import Settings, generate
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, Settings(scenes=16, views=4, seed=3), workers=1, progress=False)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests on tiny models (still run by make test)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny InternVL checkpoint (32 px tiles, 4 image tokens) built offline."""
    from occmllm.tiny import build
    return build(tmp_path_factory.mktemp("models") / "tiny", image_size=32, vision_hidden=32, vision_layers=2,
                 text_hidden=64, text_layers=2)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """8 scenes x 2 views at 64 px, with stage-1 and test files (and their meta JSON)."""
    from data_tools import builders
    from data_tools.synthocc import Settings, generate
    from occmllm.dataset import load_dataset
    out = generate(tmp_path_factory.mktemp("synth_small") / "data", Settings(scenes=8, views=2, seed=1, size=64,
                   focal=80.0), progress=False)
    ds = load_dataset(out)
    builders.write_stage(builders.stage1_records(ds.split(None)), out / "stages/step1.jsonl", ds, "step1")
    builders.write_stage(builders.test_records(ds.split("test")), out / "stages/test.jsonl", ds, "test")
    return out


SMALL_RECON = dict(widths=[8, 16], local_width=8, global_width=16, hidden=32, layers=2, fourier=2)


def losses_before_and_after(views, steps: int) -> tuple[dict, dict]:
    """Every reconstruction loss on one fixed batch of four of ``views`` (TrainingViews), before and
    after ``steps`` Adam steps of a fresh ``SMALL_RECON`` model on it."""
    import numpy as np
    import torch
    from reconstruction.model import ReconConfig, SDFReconstructor
    from reconstruction.train import ReconTrainArguments, collate, losses
    torch.manual_seed(0)
    model = SDFReconstructor(ReconConfig(**SMALL_RECON))
    args = ReconTrainArguments(sdf_points=256, eikonal_points=32, colour_points=64, silhouette_rays=32, ray_samples=8)
    rng = np.random.default_rng(0)
    batch = collate([views.item(i, rng, 256, 64, 32, 8) for i in range(4)], "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = {k: float(v.detach()) for k, v in losses(model, batch, args).items()}
    for _ in range(steps):
        parts = losses(model, batch, args)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
    return first, {k: float(v.detach()) for k, v in losses(model, batch, args).items()}


@pytest.fixture(scope="session")
def recon_model(synth, tmp_path_factory) -> Path:
    """A small reconstruction model trained for a few steps on ``synth`` (mechanics, not quality)."""
    from reconstruction.model import ReconConfig
    from reconstruction.train import ReconTrainArguments, train
    out = tmp_path_factory.mktemp("recon") / "model"
    args = ReconTrainArguments(data=str(synth), output_dir=str(out), steps=6, batch_size=2, sdf_points=128,
                               eikonal_points=16, colour_points=32, silhouette_rays=16, ray_samples=8, save_steps=3,
                               log_steps=3, progress=False)
    return train(args, ReconConfig(**SMALL_RECON))


def _predictions(views: list[dict]) -> dict[str, str]:
    """A model's Q1 answers that are wrong for every third view."""
    from occmllm.questions import category_answer

    def wrong(category):
        return category_answer("remote" if category != "remote" else "jar")
    return {v["id"]: wrong(v["category"]) if k % 3 == 0 else category_answer(v["category"])
            for k, v in enumerate(views)}


@pytest.fixture(scope="session")
def step3_file(synth_small, tmp_path_factory) -> Path:
    """Stage-3 preference pairs (category) on every view of the small set."""
    import json
    from data_tools import builders
    from occmllm.dataset import load_dataset
    ds = load_dataset(synth_small)
    views = ds.split(None)
    tmp = tmp_path_factory.mktemp("step3")
    (tmp / "predictions.json").write_text(json.dumps(_predictions(views)))
    pairs = builders.stage3_pairs(views, tmp / "predictions.json")
    return builders.write_stage(pairs, tmp / "step3.jsonl", ds, "step3", kind="preference")


STAGE4_RENDERS = "renders/stage4_test"


@pytest.fixture(scope="session")
def stage4_file(synth_small, tmp_path_factory) -> Path:
    """Stage-4 chain records on every view of the small set (first answers wrong for every third
    view), with renders of the true meshes under ``STAGE4_RENDERS``."""
    from data_tools import builders
    from data_tools.renders import render_views
    from occmllm.dataset import load_dataset
    ds = load_dataset(synth_small)
    views = ds.split(None)
    render_views(synth_small, STAGE4_RENDERS, None, progress=False)
    from occmllm.questions import parse_category
    own = _predictions(views)
    first_right = {v["id"]: parse_category(own[v["id"]]) == v["category"] for v in views}
    recs = builders.stage4_records(views, first_right, STAGE4_RENDERS, seed=0, plan_fraction=0.25, own_answers=own)
    return builders.write_stage(recs, tmp_path_factory.mktemp("stage4") / "step4.jsonl", ds, "step4")


def stop_inference_in_second_batch(monkeypatch, mode: str) -> None:
    """The next ``inference.py`` run in ``mode`` stops in its second batch, as a Ctrl-C would."""
    from occmllm.modes import MODE_RUNNERS
    real = MODE_RUNNERS[mode]
    calls = []

    def runner(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setitem(MODE_RUNNERS, mode, runner)
