"""Long runs: an existing run is never overwritten, SIGTERM stops a run cleanly with its state saved, and
--resume continues it to the same parameters as a run that was never interrupted (1 and 2 ranks, both
trainers); a resume whose hyperparameters changed what matters is refused with the difference."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences import trainer
from lm_human_preferences.utils import stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")

# A policy run of the tiny `test` experiment long enough to be interrupted in the middle: its reward model
# (trained first) and then 30 PPO updates, a checkpoint every 12.
POLICY_FLAGS = ["--ppo.total_episodes", str(16 * 30), "--ppo.batch_size", "16", "--run.save_interval", "12",
                "--run.log_interval", "1000"]
REWARD_FLAGS = ["--labels.num_train", "800", "--batch_size", "8", "--run.log_interval", "1000",
                "--normalize_samples", "32", "--debug_normalize", "16"]


def launch(*argv, timeout=600):
    return subprocess.run([sys.executable, "launch.py", *argv], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def interrupt(argv, when_printed, *, signum=signal.SIGTERM, timeout=600):
    """Start `launch.py argv`, send `signum` once a line containing `when_printed` appears; (exit code, output)."""
    process = subprocess.Popen([sys.executable, "launch.py", *argv], cwd=REPO_ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline, sent = [], time.time() + timeout, False
    for line in process.stdout:
        lines.append(line)
        if not sent and when_printed in line:
            process.send_signal(signum)
            sent = True
        if time.time() > deadline:
            process.kill()
            break
    return process.wait(), "".join(lines)


def checkpoint_tensors(directory):
    reader = tf.train.load_checkpoint(directory)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=f"{what}: {name}")


def test_a_sigterm_saves_the_run_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight = launch("train_policy", "test", "straight", "--save_dir", str(tmp_path), *POLICY_FLAGS)
    assert straight.returncode == 0, straight.stdout[-3000:]

    code, output = interrupt(["train_policy", "test", "cut", "--save_dir", str(tmp_path), *POLICY_FLAGS],
                             "update 4/30")
    assert code == trainer.INTERRUPTED_EXIT_CODE, output[-3000:]
    assert "received SIGTERM" in output and "interrupted: train_policy stopped after update" in output
    assert "--resume" in output
    stopped_at = int(output.split("interrupted: train_policy stopped after update ")[1].split()[0])
    assert 4 <= stopped_at < 30, output[-2000:]
    state = os.path.join(tmp_path, "cut", "resume", "ppo")
    assert tf.train.latest_checkpoint(state).endswith(f"state.ckpt-{stopped_at}")

    resumed = launch("train_policy", "test", "cut", "--save_dir", str(tmp_path), *POLICY_FLAGS, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming after update {stopped_at} of 30" in resumed.stdout
    assert "the reward model in" in resumed.stdout  # trained before the interruption: not trained again
    # the same final policy and the same optimizer state as the run that never stopped
    for part in ("policy/checkpoints", "resume/ppo"):
        assert_same_tensors(checkpoint_tensors(os.path.join(tmp_path, "straight", part)),
                            checkpoint_tensors(os.path.join(tmp_path, "cut", part)), part)
    # TensorBoard continues on the same steps without duplicates, and the logged numbers agree
    cut_events = stats.read_scalars(os.path.join(tmp_path, "cut", "tb", "ppo"))
    straight_events = stats.read_scalars(os.path.join(tmp_path, "straight", "tb", "ppo"))
    assert [step for step, _ in cut_events["objective/score"]] == list(range(30))
    np.testing.assert_allclose([v for _, v in cut_events["objective/kl_coef"]],
                               [v for _, v in straight_events["objective/kl_coef"]], rtol=1e-6)

    # a finished run is never overwritten: its checkpoint files keep their bytes
    policy_dir = os.path.join(tmp_path, "straight", "policy", "checkpoints")
    before = {name: open(os.path.join(policy_dir, name), "rb").read() for name in os.listdir(policy_dir)}
    again = launch("train_policy", "test", "straight", "--save_dir", str(tmp_path), *POLICY_FLAGS)
    assert again.returncode == 1, again.stdout[-3000:]
    assert f"{os.path.join(tmp_path, 'straight')} already holds a run" in again.stdout
    assert "--resume" in again.stdout and "another NAME" in again.stdout and "Traceback" not in again.stdout
    assert {name: open(os.path.join(policy_dir, name), "rb").read() for name in os.listdir(policy_dir)} == before


def test_a_resume_that_changes_what_matters_is_refused_with_the_difference(tmp_path):
    first = launch("train_reward", "test", "run", "--save_dir", str(tmp_path))
    assert first.returncode == 0, first.stdout[-3000:]
    changed = launch("train_reward", "test", "run", "--save_dir", str(tmp_path), "--resume", "--lr", "0.5",
                     "--run.log_interval", "3")
    assert changed.returncode == 1, changed.stdout[-3000:]
    assert "lr: saved 0.001, now 0.5" in changed.stdout and "log_interval" not in changed.stdout
    assert "Traceback" not in changed.stdout
    harmless = launch("train_reward", "test", "run", "--save_dir", str(tmp_path), "--resume",
                      "--run.log_interval", "3")
    assert harmless.returncode == 0, harmless.stdout[-3000:]
    assert "nothing to resume" in harmless.stdout


def test_reward_training_resumes_exactly(tmp_path):
    straight = launch("train_reward", "test", "straight", "--save_dir", str(tmp_path), *REWARD_FLAGS)
    assert straight.returncode == 0, straight.stdout[-3000:]
    code, output = interrupt(["train_reward", "test", "cut", "--save_dir", str(tmp_path), *REWARD_FLAGS],
                             "after normalising before training", signum=signal.SIGINT)
    assert code == trainer.INTERRUPTED_EXIT_CODE, output[-3000:]
    assert "interrupted: train_reward stopped after step" in output
    resumed = launch("train_reward", "test", "cut", "--save_dir", str(tmp_path), *REWARD_FLAGS, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming the reward model after step" in resumed.stdout
    assert_same_tensors(checkpoint_tensors(os.path.join(tmp_path, "straight", "reward_model", "checkpoints")),
                        checkpoint_tensors(os.path.join(tmp_path, "cut", "reward_model", "checkpoints")),
                        "reward model")


def test_two_ranks_stop_at_the_same_update_and_resume_exactly(tmp_path):
    reward = launch("train_reward", "test", "rm", "--save_dir", str(tmp_path))  # one reward model for all 3 runs
    assert reward.returncode == 0, reward.stdout[-3000:]
    flags = ["--mpi", "2", "--save_dir", str(tmp_path), *POLICY_FLAGS, "--rewards.train_new_model", "off",
             "--rewards.trained_model", os.path.join(tmp_path, "rm", "reward_model")]
    straight = launch("train_policy", "test", "straight", *flags)
    assert straight.returncode == 0, straight.stdout[-3000:]
    code, output = interrupt(["train_policy", "test", "cut", *flags], "update 4/30")
    assert code == trainer.INTERRUPTED_EXIT_CODE, output[-3000:]
    assert output.count("interrupted: train_policy stopped after update") == 1  # rank 0 speaks for both
    resumed = launch("train_policy", "test", "cut", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "policy parameters identical on all 2 ranks" in resumed.stdout
    assert_same_tensors(checkpoint_tensors(os.path.join(tmp_path, "straight", "policy", "checkpoints")),
                        checkpoint_tensors(os.path.join(tmp_path, "cut", "policy", "checkpoints")), "policy")
