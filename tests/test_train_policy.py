"""PPO training (SPEC section 8) end to end: learning against a reward model, the KL penalty's pull,
truncation and penalty, gradient accumulation, saving and sampling, and a two-rank run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import launcher, lm_tasks, train_policy, train_reward
from lm_human_preferences.language import trained_models
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.utils import stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E = 4  # the `test` encoding's id of "e"


def run_cli(*argv, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def demo_task_overrides(**extra):
    settings = {"task.query_length": 4, "task.response_length": 8, "task.policy.initial_model": "demo"}
    settings.update(extra)
    return settings


@pytest.fixture(scope="module")
def letter_e_reward_model(tmp_path_factory):
    """A reward model trained on synthetic labels whose judge prefers the letter e (the demo's labeler)."""
    save_dir = tmp_path_factory.mktemp("reward")
    hparams = launcher.resolve_hparams("train_reward", "test", "rm", save_dir=str(save_dir), overrides={
        **demo_task_overrides(), "labels.judge": "letter_e", "labels.num_train": 1024, "labels.num_valid": 0,
        "batch_size": 32, "lr": 2e-3, "normalize_samples": 256, "rollout_batch_size": 64})
    with tf.Graph().as_default():
        train_reward.train(hparams)
    return os.path.join(hparams.run.save_dir, "reward_model")


def policy_hparams(tmp_path, reward_model, name="run", **overrides):
    settings = {**demo_task_overrides(), "rewards.train_new_model": "off", "rewards.trained_model": reward_model,
                "ppo.total_episodes": 32 * 25, "ppo.batch_size": 32, "ppo.nminibatches": 2, "ppo.lr": 3e-3,
                "run.log_interval": 1000, "run.save_interval": 1000}
    settings.update(overrides)
    return launcher.resolve_hparams("train_policy", "test", name, save_dir=str(tmp_path), overrides=settings)


def curve(save_dir, tag):
    return np.array([value for _, value in stats.read_scalars(os.path.join(save_dir, "tb"))[tag]])


def test_ppo_raises_the_score_and_the_kl_penalty_holds_the_policy_back(tmp_path, letter_e_reward_model):
    weak = policy_hparams(tmp_path, letter_e_reward_model, "weak_kl", **{"rewards.kl_coef": 0.01, "run.judge": "letter_e"})
    strong = policy_hparams(tmp_path, letter_e_reward_model, "strong_kl", **{"rewards.kl_coef": 1.0})
    for hparams in (weak, strong):
        with tf.Graph().as_default():
            train_policy.train(hparams)
    score, kl = curve(weak.run.save_dir, "objective/score"), curve(weak.run.save_dir, "objective/kl")
    # the reward model's score of the rollouts rose clearly; the true objective (the judge's) rose with it
    assert score[-5:].mean() > score[:3].mean() + 0.5, score
    judge = curve(weak.run.save_dir, "objective/judge")
    assert judge[-5:].mean() > judge[:3].mean() + 0.02, judge
    assert np.all(np.isfinite(kl)) and kl[-1] > 0, kl
    # a large kl_coef keeps the policy closer to the reference policy
    strong_kl = curve(strong.run.save_dir, "objective/kl")
    assert strong_kl[-5:].mean() < 0.5 * kl[-5:].mean(), (strong_kl, kl)
    for tag in ("ppo/policy/approxkl", "ppo/val/var_explained", "objective/kl_coef", "elapsed/fps"):
        assert np.all(np.isfinite(curve(weak.run.save_dir, tag))), tag


def test_unfinished_responses_get_the_penalty_and_are_truncated_before_scoring(tmp_path, letter_e_reward_model):
    hparams = policy_hparams(tmp_path, letter_e_reward_model, **{
        "task.truncate_token": E, "task.truncate_after": 3, "task.penalty_reward_value": -7,
        "ppo.total_episodes": 32})
    task = hparams.task
    with tf.Graph().as_default():
        trainer = train_policy.PPOTrainer(hparams, TrainedModel("demo"), TrainedModel(
            "reward_model", savedir=letter_e_reward_model, scope="reward_model"), TrainedModel("demo").encoding.get_encoder())
        queries = np.random.RandomState(0).randint(0, 27, (32, 4)).astype(np.int32)
        _, details = trainer.update(queries, 0)
    responses, scores = details["responses"], details["scores"]
    ends = [np.flatnonzero(r[3:] == E) for r in responses]
    unfinished = np.array([len(e) == 0 for e in ends])
    assert unfinished.any() and (~unfinished).any(), "the sample should hold both kinds"
    np.testing.assert_array_equal(scores[unfinished], -7)
    assert np.all(scores[~unfinished] != -7)
    # what the reward model scored: the response cut after its first e at index >= 3
    finished = responses[~unfinished][0]
    cut = lm_tasks.postprocess_responses(finished[None], task, 27)[0]
    first = 3 + np.flatnonzero(finished[3:] == E)[0]
    assert np.all(cut[first + 1:] == 27) and np.array_equal(cut[:first + 1], finished[:first + 1])


def one_update_params(tmp_path, reward_model, micro_batches):
    hparams = policy_hparams(tmp_path, reward_model, f"micro{micro_batches}", **{
        "ppo.micro_batches": micro_batches, "ppo.total_episodes": 32, "ppo.noptepochs": 1, "ppo.nminibatches": 1})
    with tf.Graph().as_default():
        tf.set_random_seed(5)
        trainer = train_policy.PPOTrainer(hparams, TrainedModel("demo"), TrainedModel(
            "reward_model", savedir=reward_model, scope="reward_model"), TrainedModel("demo").encoding.get_encoder())
        queries = np.random.RandomState(1).randint(0, 27, (32, 4)).astype(np.int32)
        update_stats, details = trainer.update(queries, 0)
        return details["responses"], trainer.sess.run(trainer.policy.get_params()), update_stats


def test_gradient_accumulation_gives_the_same_update_and_the_same_statistics(tmp_path, letter_e_reward_model):
    responses_1, params_1, stats_1 = one_update_params(tmp_path, letter_e_reward_model, 1)
    responses_4, params_4, stats_4 = one_update_params(tmp_path, letter_e_reward_model, 4)
    np.testing.assert_array_equal(responses_1, responses_4)  # same rollout, so the updates are comparable
    for before, after in zip(params_1, params_4):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-6)
    # every logged number, variances and var_explained included, is the minibatch's, whatever the split
    assert stats_1.keys() == stats_4.keys()
    for name in stats_1:
        if not name.startswith("time/"):
            np.testing.assert_allclose(stats_4[name], stats_1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_moved_run_directory_still_loads_and_samples(tmp_path, letter_e_reward_model):
    hparams = policy_hparams(tmp_path, letter_e_reward_model, **{"ppo.total_episodes": 64})
    with tf.Graph().as_default():
        train_policy.train(hparams)
    for name in ("train_policy_hparams.json", "policy/hparams.json", "policy/encoding", "policy/checkpoints/checkpoint"):
        assert os.path.exists(os.path.join(hparams.run.save_dir, name)), name
    with open(os.path.join(hparams.run.save_dir, "policy", "checkpoints", "checkpoint")) as f:
        state = f.read()
    assert 'model_checkpoint_path: "model.ckpt-2"' in state and str(tmp_path) not in state, state  # relative
    moved = str(tmp_path / "elsewhere" / "run")
    os.renames(hparams.run.save_dir, moved)
    assert tf.train.latest_checkpoint(os.path.join(moved, "policy", "checkpoints")) == \
        os.path.join(moved, "policy", "checkpoints", "model.ckpt-2")
    result = run_cli("sample.py", "sample", "--save_dir", moved, "--nsamples", "5", "--batch_size", "4")
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("=" * 80 + "\n") == 5


def write_2019_style_run(run_dir):
    """A run directory laid out like the 2019 releases: policy/checkpoints/model.ckpt-STEP with variables named
    policy/model/..., hparams.json, encoding, and a train_policy_hparams.json as 2019 wrote it."""
    model = TrainedModel("test")
    os.makedirs(os.path.join(run_dir, "policy", "checkpoints"))
    with tf.Graph().as_default():
        from lm_human_preferences.policy import Policy
        policy = Policy(model, scope="policy")
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            tf.train.Saver(policy.get_params()).save(sess, os.path.join(run_dir, "policy", "checkpoints",
                                                                         "model.ckpt"), global_step=1000)
            values = {v.op.name: sess.run(v) for v in policy.get_params()}
    trained_models.write_model_files(os.path.join(run_dir, "policy"), model.hparams(), "test")
    hparams_2019 = {
        "run": {"seed": 1, "log_interval": 10, "save_interval": 50, "save_dir": "gs://somewhere/run"},
        "task": {"query_length": 3, "query_dataset": "test", "query_prefix": "", "query_suffix": "",
                 "start_text": None, "end_text": None, "response_length": 4, "truncate_token": None,
                 "truncate_after": 0, "penalty_reward_value": -1,
                 "policy": {"temperature": 0.7, "initial_model": "test"}},
        "rewards": {"kl_coef": 0.1, "adaptive_kl": None, "trained_model": "gs://somewhere/reward_model",
                    "train_new_model": None},
        "ppo": {"total_episodes": 2000000, "batch_size": 64, "nminibatches": 1, "noptepochs": 4, "lr": 5e-06,
                "vf_coef": 0.1, "cliprange": 0.2, "cliprange_value": 0.2, "gamma": 1, "lam": 0.95,
                "whiten_rewards": True},
    }
    with open(os.path.join(run_dir, "train_policy_hparams.json"), "w") as f:
        json.dump(hparams_2019, f, indent=2)
    return values


def test_a_2019_style_run_directory_samples(tmp_path):
    values = write_2019_style_run(str(tmp_path))
    assert "policy/model/h0/attn/c_attn/w" in values and "policy/model/heads/value/w" in values
    result = run_cli("sample.py", "sample", "--save_dir", str(tmp_path), "--nsamples", "3")
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("=" * 80 + "\n") == 3


def test_two_ranks_complete_with_identical_parameters(tmp_path):
    # 16 episodes per update: each rank's minibatch holds the 8 that reward whitening needs
    result = run_cli("launch.py", "train_policy", "test", "two", "--mpi", "2", "--save_dir", str(tmp_path),
                     "--ppo.batch_size", "16", "--ppo.total_episodes", "32")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "reward_model parameters identical on all 2 ranks" in result.stdout
    assert "policy parameters identical on all 2 ranks" in result.stdout
    assert os.path.exists(os.path.join(tmp_path, "two", "policy", "checkpoints", "checkpoint"))


# ----- the 2019 run: its length, logs, checkpoints and recorded hyperparameters -------------------------------------

def test_run(tmp_path, name="run", **overrides):
    """A train_policy run of the `test` experiment (it trains its tiny reward model first)."""
    hparams = launcher.resolve_hparams("train_policy", "test", name, save_dir=str(tmp_path), overrides=overrides)
    with tf.Graph().as_default():
        train_policy.train(hparams)
    return hparams.run.save_dir


test_run.__test__ = False  # a helper, not a test


def test_the_number_of_updates_is_rounded_up_and_logs_start_at_step_0(tmp_path):
    save_dir = test_run(tmp_path, **{"ppo.total_episodes": 20, "ppo.batch_size": 8})  # 2.5 batches: 3 updates
    ppo_events = stats.read_scalars(os.path.join(save_dir, "tb", "ppo"))
    assert [step for step, _ in ppo_events["elapsed/updates"]] == [0, 1, 2]
    assert [value for _, value in ppo_events["elapsed/updates"]] == [1, 2, 3]
    assert [value for _, value in ppo_events["elapsed/steps/serial"]] == [4, 8, 12]  # response_length 4
    assert [value for _, value in ppo_events["elapsed/steps/total"]] == [32, 64, 96]  # x batch_size 8
    # the learning rate anneals to 0 over the 3 updates
    np.testing.assert_allclose([v for _, v in ppo_events["objective/lr"]], [1e-3, 1e-3 * 2 / 3, 1e-3 / 3], rtol=1e-6)
    assert tf.train.latest_checkpoint(os.path.join(save_dir, "policy", "checkpoints")).endswith("model.ckpt-3")
    reward_events = stats.read_scalars(os.path.join(save_dir, "tb", "reward_model"))
    assert reward_events["train_reward/minibatch/loss"][0][0] == 0
    assert "objective/score" not in reward_events and "train_reward/minibatch/loss" not in ppo_events


def test_the_saved_hyperparameters_name_the_reward_model_that_was_used(tmp_path):
    save_dir = test_run(tmp_path, **{"ppo.total_episodes": 8})
    with open(os.path.join(save_dir, "train_policy_hparams.json")) as f:
        saved = json.load(f)
    assert saved["rewards"]["trained_model"] == os.path.join(save_dir, "reward_model")
    assert saved["rewards"]["train_new_model"]["run"]["save_dir"] == save_dir  # as 2019 wrote it
    with open(os.path.join(save_dir, "reward_model", "checkpoints", "checkpoint")) as f:
        assert f.readline().strip() == 'model_checkpoint_path: "model.ckpt"'  # no step suffix, relative


def test_policy_runs_keep_the_last_20_checkpoints(tmp_path):
    save_dir = test_run(tmp_path, **{"ppo.total_episodes": 8 * 23, "run.save_interval": 1, "run.log_interval": 100})
    kept = sorted(int(name.split("-")[1].split(".")[0]) for name in os.listdir(os.path.join(save_dir, "policy",
                                                                                                 "checkpoints"))
                  if name.endswith(".index"))
    assert kept == list(range(4, 24)), kept


def test_a_run_that_fails_after_training_started_saves_where_it_was(tmp_path, monkeypatch):
    real_update = train_policy.PPOTrainer.update

    def failing_update(self, queries, update_index):
        if update_index == 2:
            raise RuntimeError("the GPU fell off")
        return real_update(self, queries, update_index)

    monkeypatch.setattr(train_policy.PPOTrainer, "update", failing_update)
    with pytest.raises(RuntimeError, match="the GPU fell off"):
        test_run(tmp_path, **{"ppo.total_episodes": 8 * 5, "run.save_interval": 100})
    checkpoints = os.path.join(tmp_path, "run", "policy", "checkpoints")
    assert tf.train.latest_checkpoint(checkpoints).endswith("model.ckpt-2")  # the 2 updates that finished


def test_a_failure_while_saving_is_not_followed_by_a_second_save(tmp_path, monkeypatch):
    calls = []

    def failing_save(self, save_dir, step, state=True):
        calls.append(step)
        raise OSError("disk full")

    monkeypatch.setattr(train_policy.PPOTrainer, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        test_run(tmp_path, **{"ppo.total_episodes": 8 * 3, "run.save_interval": 2})
    assert calls == [2]


@pytest.mark.parametrize("overrides, ranks, message", [
    ({"ppo.batch_size": 8, "ppo.nminibatches": 2}, 1, r"4 episodes.*ppo.batch_size=8 / 1 ranks / ppo.nminibatches=2"),
    ({"ppo.batch_size": 16}, 4, r"4 episodes.*ppo.batch_size=16 / 4 ranks"),
])
def test_whitening_a_minibatch_below_8_episodes_is_refused(overrides, ranks, message):
    hparams = launcher.resolve_hparams("train_policy", "test", "x", overrides=overrides)
    with pytest.raises(ValueError, match=message):
        train_policy.batch_sizes(hparams.ppo, ranks)
    hparams.ppo.whiten_rewards = False  # without whitening a small minibatch is fine
    assert train_policy.batch_sizes(hparams.ppo, ranks).minibatch == 4


def test_whitening_guard_stops_the_run_before_the_reward_model_is_trained(tmp_path):
    with pytest.raises(ValueError, match="ppo.whiten_rewards"):
        test_run(tmp_path, **{"ppo.nminibatches": 2})
    assert not os.path.exists(os.path.join(tmp_path, "run"))


def test_samples_are_printed_truncated_with_their_total(tmp_path, letter_e_reward_model, capsys):
    hparams = policy_hparams(tmp_path, letter_e_reward_model, **{
        "task.truncate_token": E, "task.truncate_after": 1, "ppo.total_episodes": 32, "rewards.kl_coef": 0.5})
    encoder = TrainedModel("demo").encoding.get_encoder()
    with tf.Graph().as_default():
        trainer = train_policy.PPOTrainer(hparams, TrainedModel("demo"), TrainedModel(
            "reward_model", savedir=letter_e_reward_model, scope="reward_model"), encoder)
        queries = np.random.RandomState(0).randint(0, 27, (32, 4)).astype(np.int32)
        _, details = trainer.update(queries, 0)
    capsys.readouterr()
    train_policy.log_samples(encoder, queries, details, count=32)
    printed = capsys.readouterr().out
    cut = lm_tasks.postprocess_responses(details["responses"], hparams.task, 27)
    assert not np.array_equal(cut, details["responses"]), "some responses should have been cut"
    for i in range(32):
        total = details["scores"][i] - 0.5 * details["kl"][i]
        assert f"response: {encoder.decode(cut[i])!r}\n  score = {details['scores'][i]:+.3f}\n" \
               f"  kl = {details['kl'][i]:+.3f}\n  total = {total:+.3f}" in printed


def test_a_gs_save_directory_holds_the_whole_run_and_samples_from_there(tmp_path, gcs_bucket, monkeypatch):
    """2019 saved runs to gs://: written locally, uploaded after each save (a real Cloud Storage emulator)."""
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    save_dir = test_run(f"{gcs_bucket}/runs", **{"ppo.total_episodes": 16, "run.save_interval": 1})
    assert save_dir == f"{gcs_bucket}/runs/run"
    from google.cloud import storage
    names = {blob.name for blob in storage.Client.create_anonymous_client().list_blobs(gcs_bucket[len("gs://"):])}
    for name in ("train_policy_hparams.json", "train_reward_hparams.json", "labels.json", "reward_model/encoding",
                 "reward_model/checkpoints/checkpoint", "reward_model/checkpoints/model.ckpt.index",
                 "policy/hparams.json", "policy/checkpoints/checkpoint", "policy/checkpoints/model.ckpt-2.index"):
        assert f"runs/run/{name}" in names, (name, sorted(names))
    assert any(name.startswith("runs/run/tb/ppo/events") for name in names)
    assert not any(name.endswith(".gcs-sync.json") for name in names)
    # a fresh machine (empty cache) samples from the bucket
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", LMHP_CACHE_DIR=str(tmp_path / "other_cache"))
    result = subprocess.run([sys.executable, "sample.py", "sample", "--save_dir", save_dir, "--nsamples", "2"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("=" * 80 + "\n") == 2
