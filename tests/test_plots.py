"""Learning curves (lm_human_preferences/plots.py): the mean and spread of several runs against numpy, from event
files written by the tests; every train_reward and train_policy run leaving learning_curves.png, when it ends and
when a signal stops it, without a drawing failure ever costing the run; and `./launch.py plot` with its errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from PIL import Image

from lm_human_preferences import experiments, plots, train_policy, train_reward, trainer
from lm_human_preferences.utils import stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")

PPO_PANELS = ["score of the rollouts", "KL to the reference policy", "kl_coef", "policy entropy (rollouts)",
              "value function: loss", "value function: explained variance", "clip fractions",
              "policy change per step: approx. KL"]
REWARD_PANELS = ["reward model: loss", "reward model: accuracy"]


def write_events(run_dir, stage, curves):
    """curves {tag: [(step, value), ...]} as TensorBoard events in RUN_DIR/tb/STAGE, one event per step, written
    by the project's StatsLogger (as the trainers write them)."""
    steps = sorted({step for points in curves.values() for step, _ in points})
    with stats.StatsLogger(os.path.join(run_dir, "tb", stage), enabled=True) as logger:
        for step in steps:
            logger.write(step, {tag: value for tag, points in curves.items() for s, value in points if s == step})


def figure_record(path):
    """What the PNG says it shows (its Description chunk); fails unless the file is a complete PNG image."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated or corrupt file raises
        assert image.format == "PNG" and image.width > 500 and image.height > 300, (image.format, image.size)
        return json.loads(image.text["Description"])


def launch(*argv, cwd=REPO_ROOT, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch.py"), *argv], cwd=cwd, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


# ----- several runs: the numbers ------------------------------------------------------------------------------------

def seed_runs(parent, rng):
    """Three runs of a sweep, SAVE_DIR/NAME/seed1..3: seed3 stopped after 15 of 20 updates and logged no judge;
    seed1 also trained a reward model and had two online label rounds. Returns {run: {tag: values by step}}."""
    logged = {}
    for seed, updates in (("seed1", 20), ("seed2", 20), ("seed3", 15)):
        curves = {"objective/score": [(s, float(v)) for s, v in enumerate(rng.normal(size=updates).cumsum())],
                  "objective/kl": [(s, float(v)) for s, v in enumerate(rng.uniform(0, 8, size=updates))]}
        if seed != "seed3":
            curves["objective/judge"] = [(s, float(v)) for s, v in enumerate(rng.uniform(size=updates))]
        if seed == "seed1":
            curves["online/labels"] = [(0, 64.0), (10, 128.0)]
            write_events(os.path.join(parent, seed), "reward_model",
                         {"train_reward/minibatch/loss": [(s, 1.4 - 0.01 * s) for s in range(30)],
                          "train_reward/valid/loss": [(9, 1.3), (19, 1.2), (29, 1.1)]})
        write_events(os.path.join(parent, seed), "ppo", curves)
        # as the events hold them: float32 (the reference then computes in float64)
        logged[seed] = {tag: np.float32([v for _, v in points]).astype(np.float64) for tag, points in curves.items()}
    return logged


def test_the_mean_and_spread_of_several_runs_are_those_of_numpy_on_the_steps_all_runs_logged(tmp_path):
    logged = seed_runs(str(tmp_path / "sweep"), np.random.default_rng(0))
    runs = plots.expand_runs([str(tmp_path / "sweep")])  # a sweep's directory stands for its trials
    assert [os.path.basename(r) for r in runs] == ["seed1", "seed2", "seed3"]
    scalars = {os.path.basename(run): plots.read_run(run) for run in runs}

    # objective/score: seed3 logged updates 0..14 only, so the three runs are compared there
    score = np.stack([logged[seed]["objective/score"][:15] for seed in ("seed1", "seed2", "seed3")])
    curve = plots.aggregate([scalars[seed]["objective/score"] for seed in scalars], band="std")
    np.testing.assert_array_equal(curve.steps, np.arange(15))
    np.testing.assert_allclose(curve.mean, score.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(curve.high - curve.mean, score.std(axis=0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(curve.mean - curve.low, score.std(axis=0, ddof=1), rtol=1e-5)
    assert not curve.all_steps and [len(steps) for steps, _ in curve.runs] == [20, 20, 15]  # faint: every step
    curve = plots.aggregate([scalars[seed]["objective/kl"] for seed in scalars], band="minmax")
    kl = np.stack([logged[seed]["objective/kl"][:15] for seed in ("seed1", "seed2", "seed3")])
    np.testing.assert_allclose(curve.low, kl.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(curve.high, kl.max(axis=0), rtol=1e-6)
    # the judge's score: the mean of the two runs that logged it, on all 20 updates
    curve = plots.aggregate([scalars[seed]["objective/judge"] for seed in ("seed1", "seed2")])
    judge = np.stack([logged["seed1"]["objective/judge"], logged["seed2"]["objective/judge"]])
    np.testing.assert_allclose(curve.mean, judge.mean(axis=0), rtol=1e-6)
    assert curve.all_steps and len(curve.steps) == 20

    drawn = plots.draw(scalars, str(tmp_path / "three.png"), title="three seeds", band="std")
    assert drawn.panels == ["judge's true score (synthetic judge)", "score of the rollouts",
                            "KL to the reference policy", "reward model: loss"]
    assert figure_record(tmp_path / "three.png") == drawn.record()
    assert drawn.record()["band"] == "std" and drawn.online_rounds == [0, 10]
    assert set(drawn.partial_tags) == {"objective/score", "objective/kl"}


def test_a_repeated_step_keeps_its_last_value_and_a_single_run_has_no_band():
    curve = plots.aggregate([[(0, 1.0), (1, 2.0), (1, 5.0), (2, 3.0)]])
    np.testing.assert_array_equal(curve.steps, [0, 1, 2])
    np.testing.assert_array_equal(curve.mean, [1.0, 5.0, 3.0])
    np.testing.assert_array_equal(curve.low, curve.high)
    np.testing.assert_allclose(plots.running_mean(np.array([1.0, 2.0, 3.0, 7.0]), 2), [1.0, 1.5, 2.5, 5.0])


# ----- every run leaves learning_curves.png -----------------------------------------------------------------------

def tiny(command, save_dir, name, **overrides):
    return experiments.resolve_hparams(command, "test", name, save_dir=str(save_dir), overrides=overrides)


def test_a_reward_run_leaves_its_learning_curves(tmp_path, capsys):
    hparams = tiny("train_reward", tmp_path, "rm", **{"labels.num_valid": 8})
    with tf.Graph().as_default():
        train_reward.train(hparams)
    path = os.path.join(hparams.run.save_dir, plots.FILENAME)
    record = figure_record(path)
    assert record["panels"] == REWARD_PANELS
    assert {"train_reward/minibatch/loss", "train_reward/valid/loss", "train_reward/minibatch/accuracy",
            "train_reward/valid/accuracy"} <= set(record["tags"])
    assert f"learning curves: {path}" in capsys.readouterr().out


def test_a_policy_run_leaves_its_learning_curves_with_the_reward_model_it_trained(tmp_path, capsys):
    hparams = tiny("train_policy", tmp_path, "policy", **{"run.judge": "letter_e",
                                                          "rewards.train_new_model.labels.num_valid": 8})
    with tf.Graph().as_default():
        train_policy.train(hparams)  # from Python, not the command line
    path = os.path.join(hparams.run.save_dir, plots.FILENAME)
    record = figure_record(path)
    assert record["panels"] == ["judge's true score (synthetic judge)", *PPO_PANELS, *REWARD_PANELS]
    assert {"objective/score", "objective/kl", "objective/kl_coef", "ppo/val/var_explained", "ppo/policy/clipfrac",
            "ppo/val/clipfrac", "train_reward/valid/loss"} <= set(record["tags"])
    # drawn once, by the policy run, not also by the reward-model training inside it
    assert capsys.readouterr().out.count("learning curves: ") == 1


def test_a_run_saved_to_gs_uploads_its_learning_curves(tmp_path, gcs_bucket, monkeypatch):
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    hparams = tiny("train_reward", f"{gcs_bucket}/runs", "rm")
    with tf.Graph().as_default():
        train_reward.train(hparams)
    from google.cloud import storage
    bucket = storage.Client.create_anonymous_client().bucket(gcs_bucket[len("gs://"):])
    uploaded = tmp_path / "uploaded.png"
    bucket.blob(f"runs/rm/{plots.FILENAME}").download_to_filename(str(uploaded))
    assert figure_record(uploaded)["panels"] == REWARD_PANELS


def test_a_failed_drawing_costs_neither_the_run_nor_its_own_error(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(plots, "draw", broken)
    hparams = tiny("train_reward", tmp_path, "rm")
    with tf.Graph().as_default():
        train_reward.train(hparams)
    assert train_reward.is_finished(hparams.run.save_dir)  # the reward model is saved all the same
    assert not os.path.exists(os.path.join(hparams.run.save_dir, plots.FILENAME))
    err = capsys.readouterr().err
    assert "warning: the learning curves of" in err and "OSError: disk full second line" in err
    assert len(err.strip().splitlines()) == 1, err

    # the run's own error goes on, not the drawing's
    with pytest.raises(RuntimeError, match="the run's own error"):
        with plots.CurvesWhenDone(hparams.run.save_dir):
            raise RuntimeError("the run's own error")
    assert "OSError: disk full" in capsys.readouterr().err


def test_a_run_stopped_by_a_signal_leaves_its_learning_curves(tmp_path):
    argv = [sys.executable, "launch.py", "train_policy", "test", "cut", "--save_dir", str(tmp_path),
            "--ppo.total_episodes", str(16 * 30), "--ppo.batch_size", "16", "--run.log_interval", "1000"]
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines, deadline, sent = [], time.time() + 600, False
    for line in process.stdout:
        lines.append(line)
        if not sent and "update 4/30" in line:
            process.send_signal(signal.SIGTERM)
            sent = True
        if time.time() > deadline:
            process.kill()
    output = "".join(lines)
    assert process.wait() == trainer.INTERRUPTED_EXIT_CODE, output[-3000:]
    path = os.path.join(tmp_path, "cut", plots.FILENAME)
    assert f"learning curves: {path}" in output and "interrupted: train_policy stopped after update" in output
    record = figure_record(path)
    assert record["panels"] == PPO_PANELS + REWARD_PANELS
    stopped_at = int(output.split("interrupted: train_policy stopped after update ")[1].split()[0])
    assert stopped_at < 30
    events = stats.read_scalars(os.path.join(tmp_path, "cut", "tb", "ppo"))
    assert len(events["objective/score"]) == stopped_at  # what the figure was drawn from: the updates done


# ----- ./launch.py plot ---------------------------------------------------------------------------------------------

def test_the_plot_command_draws_a_sweep_and_refuses_what_it_cannot_do_writing_nothing(tmp_path):
    seed_runs(str(tmp_path / "sweep"), np.random.default_rng(1))
    work = tmp_path / "work"
    work.mkdir()
    first = launch("plot", str(tmp_path / "sweep"), cwd=work)  # default output: ./plot.png
    assert first.returncode == 0, first.stdout
    record = figure_record(work / "plot.png")
    assert record["runs"] == ["seed1", "seed2", "seed3"] and record["band"] == "std"
    assert "reward model: loss" in record["panels"]
    assert f"wrote plot.png: 3 runs (seed1, seed2, seed3)" in first.stdout
    assert "the runs logged different steps" in first.stdout

    before = (work / "plot.png").read_bytes()
    again = launch("plot", str(tmp_path / "sweep"), cwd=work)
    assert again.returncode == 1 and "Traceback" not in again.stdout
    assert "error: --output plot.png exists and is never overwritten silently" in again.stdout
    assert "--force" in again.stdout and (work / "plot.png").read_bytes() == before
    forced = launch("plot", str(tmp_path / "sweep" / "seed1"), str(tmp_path / "sweep" / "seed2"), "--band",
                    "minmax", "--force", cwd=work)
    assert forced.returncode == 0, forced.stdout
    assert figure_record(work / "plot.png")["band"] == "minmax"

    output = tmp_path / "out" / "one.png"
    output.parent.mkdir()
    single = launch("plot", str(tmp_path / "sweep" / "seed2"), "--output", str(output))
    assert single.returncode == 0, single.stdout
    assert figure_record(output)["runs"] == ["seed2"] and figure_record(output)["band"] is None

    (tmp_path / "empty" / "tb").mkdir(parents=True)
    target = tmp_path / "never.png"
    for argv, message in [
        ([str(tmp_path / "missing")], f"error: {tmp_path / 'missing'} does not exist; expected a train_reward or "
                                      f"train_policy run directory"),
        ([str(tmp_path / "empty")], f"error: {tmp_path / 'empty'} holds no TensorBoard events"),
        ([str(tmp_path / "sweep"), str(tmp_path / "empty")], f"error: {tmp_path / 'empty'} holds no TensorBoard"),
        ([str(tmp_path / "sweep"), "--band", "wide"], "error: --band 'wide': expected std or minmax"),
        ([str(tmp_path / "sweep"), "--output", str(tmp_path / "never.svg")], "expected a file name ending in .png"),
        ([str(tmp_path / "sweep"), "--output", str(tmp_path / "nowhere" / "x.png")],
         f"its directory {tmp_path / 'nowhere'} does not exist"),
        ([], "error: plot: no RUN_DIR given"),
        (["--force", str(tmp_path / "sweep")], "error: --force took"),
    ]:
        result = launch("plot", *argv, *(["--output", str(target)] if "--output" not in argv else []))
        assert result.returncode == 1, (argv, result.stdout)
        assert message in result.stdout and "Traceback" not in result.stdout, (argv, result.stdout)
        assert len(result.stdout.strip().splitlines()) == 2, result.stdout  # the error and the traceback hint
        assert not target.exists() and not (tmp_path / "never.svg").exists() and not (tmp_path / "nowhere").exists()
