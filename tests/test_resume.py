"""Every long training command resumes after an interruption and ends where an uninterrupted run
ends. A run is stopped right after its checkpoint at step 2 of 4 (``KeyboardInterrupt``, as a
Ctrl-C or a job scheduler's signal ends it), started again with ``--resume true``, and its final
weights and per-step losses are compared with one uninterrupted run's.

Tolerance: the HF Trainer restores the weights, optimizer, schedule, data order and random state,
so on CPU in fp32 the resumed run repeats the same arithmetic; the checks allow 1e-6 (absolute, on
weights and losses) for a kernel that sums in another order after a reload. The inference,
render and SynthOcc resume tests live beside their commands (test_inference, test_cot,
test_builders, test_reconstruction, test_synthocc)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_callback import CallbackHandler

from conftest import ROOT, STAGE4_RENDERS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOLERANCE = 1e-6


class Interrupted(KeyboardInterrupt):
    pass


@pytest.fixture
def stop_after_checkpoint(monkeypatch):
    """``stop(step)``: the next training run stops right after writing its checkpoint at ``step``."""
    def stop(step: int) -> None:
        real = CallbackHandler.on_save

        def on_save(self, args, state, control):
            control = real(self, args, state, control)
            if state.global_step == step:
                monkeypatch.setattr(CallbackHandler, "on_save", real)  # once: the resumed run goes on
                raise Interrupted
            return control
        monkeypatch.setattr(CallbackHandler, "on_save", on_save)
    return stop


def _losses(folder: Path) -> list[float]:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _assert_same_run(full: Path, resumed: Path, steps: int) -> None:
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=TOLERANCE, rtol=0, msg=key)
    losses_full, losses_resumed = _losses(full), _losses(resumed)
    assert len(losses_full) == len(losses_resumed) == steps
    assert len(set(losses_full)) > 1  # the steps trained: the comparison is not of untouched models
    assert losses_resumed == pytest.approx(losses_full, abs=TOLERANCE)


def _run_twice(run, argv, config, tmp_path, stop, steps=4):
    """The uninterrupted run into ``full``; a run stopped at step 2 and resumed into ``resumed``."""
    full = run([*argv, "--output_dir", str(tmp_path / "full")], default_config=config)
    stop(2)
    with pytest.raises(Interrupted):
        run([*argv, "--output_dir", str(tmp_path / "resumed")], default_config=config)
    assert (tmp_path / "resumed/checkpoint-2").is_dir() and not (tmp_path / "resumed/model.safetensors").exists()
    resumed = run([*argv, "--output_dir", str(tmp_path / "resumed"), "--resume", "true"], default_config=config)
    _assert_same_run(Path(full), Path(resumed), steps)


COMMON = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
          "--warmup_steps", "0", "--disable_tqdm", "true"]


def test_stage1_sft_resumes_to_the_uninterrupted_result(tiny_model, synth_small, tmp_path, stop_after_checkpoint):
    from occmllm.sft import run
    # 16 records in batches of 6: the stop falls mid-epoch and the resumed run crosses into epoch 2,
    # with fresh flip draws (augment) there
    argv = ["--model_name_or_path", str(tiny_model), "--train_data", str(synth_small / "stages/step1.jsonl"),
            "--per_device_train_batch_size", "6", "--augment", "true", "--learning_rate", "0.003", *COMMON]
    _run_twice(run, argv, ROOT / "step1_sft/config.yaml", tmp_path, stop_after_checkpoint)


def test_stage3_mpo_resumes_to_the_uninterrupted_result(tiny_model, step3_file, tmp_path, stop_after_checkpoint):
    from occmllm.mpo import run
    argv = ["--model_name_or_path", str(tiny_model), "--train_data", str(step3_file),
            "--per_device_train_batch_size", "4", "--learning_rate", "0.003", *COMMON]
    _run_twice(run, argv, ROOT / "step3_mpo/config.yaml", tmp_path, stop_after_checkpoint)


def test_stage4_rl_phase_resumes_to_the_uninterrupted_result(tiny_model, stage4_file, tmp_path, stop_after_checkpoint,
                                                             capsys):
    """Both phases: the chain-of-thought SFT finishes, the RL phase (sampled chains) is stopped at
    step 2; the resumed run keeps the finished SFT phase and resumes the RL phase."""
    from step4_selfconsistency.train import run
    config = ROOT / "step4_selfconsistency/config.yaml"
    argv = ["--model_name_or_path", str(tiny_model), "--train_data", str(stage4_file), "--renders", STAGE4_RENDERS,
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--augment", "false", "--save_strategy", "no",
            "--learning_rate", "0.003", "--logging_steps", "1", "--disable_tqdm", "true",
            "--rl_steps", "4", "--rl_save_steps", "2", "--rl_images_per_step", "2", "--rl_group_size", "2",
            "--rl_max_new_tokens", "6", "--rl_learning_rate", "0.003", "--phases", "sft,rl", "--second_look_model",
            "false", "--keep_first_answer", "0"]
    full = run([*argv, "--output_dir", str(tmp_path / "full")], default_config=config)
    stop_after_checkpoint(2)  # the SFT phase saves no checkpoint: this is RL step 2
    with pytest.raises(Interrupted):
        run([*argv, "--output_dir", str(tmp_path / "resumed")], default_config=config)
    sft_weights = (tmp_path / "resumed_cot_sft/model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    resumed = run([*argv, "--output_dir", str(tmp_path / "resumed"), "--resume", "true"], default_config=config)
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / "resumed_cot_sft/model.safetensors").stat().st_mtime_ns == sft_weights  # not trained again
    _assert_same_run(Path(full), Path(resumed), 4)
