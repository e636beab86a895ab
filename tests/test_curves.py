"""Training logs and their plot (occmllm.curves): which figures share a panel, and what is left out."""
import json

from matplotlib.image import imread

from occmllm import curves

# the shape of TRL's MPO log: its figures every logging step, then the Trainer's closing summary
MPO_LOG = [
    {"loss": 0.99, "grad_norm": 1.5, "learning_rate": 4.7e-06, "rewards/chosen": -0.0, "rewards/rejected": -0.004,
     "rewards/margins": 0.004, "rewards/accuracies": 0.78, "logps/chosen": -0.85, "entropy": 0.23, "num_tokens": 40848.0, "epoch": 0.05,
     "step": 20},
    {"loss": 0.97, "grad_norm": 1.8, "learning_rate": 2.8e-08, "rewards/chosen": -0.002, "rewards/rejected": -0.083,
     "rewards/margins": 0.081, "rewards/accuracies": 0.93, "logps/chosen": -0.93, "entropy": 0.30, "num_tokens": 418894.0, "epoch": 0.48,
     "step": 200},
    {"train_runtime": 58.5, "train_samples_per_second": 56.9, "train_loss": 0.97, "epoch": 0.5, "step": 208},
]


def test_figures_share_a_panel_by_kind_and_bookkeeping_is_left_out():
    groups = curves.panels(MPO_LOG + [{"eval_loss": 1.1, "step": 200, "smoothed": True}])
    rl = curves.panels([{"loss": 0.3, "rl/reward": 0.8, "rl/kl": 0.01, "rl/said_no": 0.4, "step": 10}])
    assert list(groups.items()) == [
        ("loss", ["loss", "eval_loss"]), ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
        ("rewards/accuracies", ["rewards/accuracies"]), ("logps", ["logps/chosen"]), ("entropy", ["entropy"]), ("grad_norm", ["grad_norm"]),
        ("learning_rate", ["learning_rate"])]
    # stage 4's rollout figures are on scales of their own: a panel each
    assert list(rl.items()) == [("loss", ["loss"]), ("rl/reward", ["rl/reward"]), ("rl/kl", ["rl/kl"]),
                                ("rl/said_no", ["rl/said_no"])]
    # the closing summary is no point of a curve, though it has a step and a loss
    assert [e["step"] for e in curves.logged_steps(MPO_LOG)] == [20, 200]


def test_the_log_and_its_plot_are_written_beside_the_checkpoint(tmp_path):
    curves.save_training_log(MPO_LOG, tmp_path, "step3: MPOTrainer")
    lines = [json.loads(x) for x in (tmp_path / curves.LOG).read_text().splitlines()]
    assert lines == MPO_LOG  # the whole log, the summary included
    one_panel = tmp_path / "one.png"
    assert curves.plot_training([{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}], one_panel, "t") == ["loss"]
    # seven panels in two columns: a taller and wider image than one panel's
    assert imread(tmp_path / curves.PLOT).shape[0] > imread(one_panel).shape[0]
    assert imread(tmp_path / curves.PLOT).shape[1] > imread(one_panel).shape[1]


def test_a_run_that_logged_no_step_still_gets_a_plot(tmp_path):
    assert curves.plot_training([MPO_LOG[-1]], tmp_path / "empty.png", "t") == []
    assert imread(tmp_path / "empty.png").shape[0] > 0
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_a_panel_spanning_orders_of_magnitude_is_drawn_on_a_log_scale():
    assert curves.log_scale("loss", [9.6, 0.5, 0.03])  # stage 1's loss: a fall of 300x
    assert not curves.log_scale("loss", [0.99, 0.95, 0.97])  # MPO's: within a few percent
    assert not curves.log_scale("rewards", [-0.08, 0.0, 0.08])  # signed figures
    assert not curves.log_scale("learning_rate", [1e-4, 5e-4, 3e-7])  # a schedule, as it is set
    assert not curves.log_scale("loss", [])


def test_a_training_stage_refreshes_its_plot_while_it_trains_at_most_so_often(tmp_path):
    from types import SimpleNamespace

    from occmllm.stage import PlotsTraining
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(is_world_process_zero=True, log_history=MPO_LOG[:1])
    PlotsTraining("step3", every_s=3600).on_log(args, state, None)
    assert not (tmp_path / curves.PLOT).exists()  # too soon after the run began
    PlotsTraining("step3", every_s=0).on_log(args, SimpleNamespace(**{**vars(state), "is_world_process_zero": False}),
                                             None)
    assert not (tmp_path / curves.PLOT).exists()  # another rank of a distributed run writes nothing
    callback = PlotsTraining("step3", every_s=0)
    callback.on_log(args, state, None)
    assert (tmp_path / curves.PLOT).is_file() and len((tmp_path / curves.LOG).read_text().splitlines()) == 1
    state.log_history = MPO_LOG[:2]
    callback.on_log(args, state, None)
    assert len((tmp_path / curves.LOG).read_text().splitlines()) == 2
