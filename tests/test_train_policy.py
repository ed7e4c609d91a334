"""PPO training (docs/algorithms.md) end to end: learning against a reward model, the KL penalty's pull,
truncation and penalty, gradient accumulation, saving and sampling, and a two-rank run; and the wiring of one
update (what is scored, what enters the rewards, the KL controller, the learning rate, Adam's steps and the
minibatches), checked from recorded session runs against references computed in the tests."""

import json
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import experiments, lm_tasks, train_policy, train_reward
from lm_human_preferences.language import trained_models
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy
from lm_human_preferences.trainer import RunInterrupted
from lm_human_preferences.utils import stats

from mpi_programs import allreduce_env
from test_trained_models import random_values

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E = 4  # the `test` encoding's id of "e"


def run_cli(*argv, timeout=300, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
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
    hparams = experiments.resolve_hparams("train_reward", "test", "rm", save_dir=str(save_dir), overrides={
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
    return experiments.resolve_hparams("train_policy", "test", name, save_dir=str(tmp_path), overrides=settings)


def demo_trainer(hparams, reward_model, **kwargs):
    """A PPOTrainer of the demo policy against the saved reward model in `reward_model` (a directory)."""
    return train_policy.PPOTrainer(hparams, TrainedModel("demo"), TrainedModel(
        "reward_model", savedir=reward_model, scope="reward_model"), TrainedModel("demo").encoding.get_encoder(),
        **kwargs)


def curve(save_dir, tag):
    return np.array([value for _, value in stats.read_scalars(os.path.join(save_dir, "tb"))[tag]])


def test_ppo_raises_the_score_and_the_kl_penalty_holds_the_policy_back(tmp_path, letter_e_reward_model):
    weak = policy_hparams(tmp_path, letter_e_reward_model, "weak_kl", **{"rewards.kl_coef": 0.01, "run.judge": "letter_e"})
    strong = policy_hparams(tmp_path, letter_e_reward_model, "strong_kl", **{"rewards.kl_coef": 1.0})
    for hparams in (weak, strong):
        with tf.Graph().as_default():
            train_policy.train(hparams)
    score, kl = curve(weak.run.save_dir, "objective/score"), curve(weak.run.save_dir, "objective/kl")
    # The reward model's score of the rollouts rose clearly; the true objective (the judge's) rose with it.
    # Gains (mean of the last 5 updates minus mean of the first 3) of this run with run.seed 1..10:
    #   score 2.249 2.331 2.173 2.335 2.271 2.327 1.971 2.197 2.201 2.167: mean 2.22, SD 0.11, min 1.97
    #   judge 0.621 0.543 0.684 0.682 0.712 0.475 0.650 0.607 0.410 0.638: mean 0.60, SD 0.10, min 0.41
    # Thresholds at about mean - 4 SD. A 10x smaller ppo.lr gains 0.45-0.50 (judge 0.04-0.05) and zeroed
    # advantages -0.17 to +0.03 (seeds 1-3): both fail. Half the lr still gains 2.07-2.16: learning saturates.
    assert score[-5:].mean() > score[:3].mean() + 1.75, score
    judge = curve(weak.run.save_dir, "objective/judge")
    assert judge[-5:].mean() > judge[:3].mean() + 0.2, judge
    assert np.all(np.isfinite(kl)) and kl[-1] > 0, kl
    # a large kl_coef keeps the policy closer to the reference policy
    strong_kl = curve(strong.run.save_dir, "objective/kl")
    assert strong_kl[-5:].mean() < 0.5 * kl[-5:].mean(), (strong_kl, kl)
    for tag in ("ppo/policy/approxkl", "ppo/val/var_explained", "objective/kl_coef", "elapsed/fps"):
        assert np.all(np.isfinite(curve(weak.run.save_dir, tag))), tag


def test_before_the_first_step_the_reference_policy_gives_the_rollout_its_own_log_probs(tmp_path,
                                                                                      letter_e_reward_model):
    """The reference policy is the initial policy as the rollout samples it: under the task's temperature and with
    the query framed by its prefix and suffix. So until PPO moves the policy every token's KL is 0, whatever the
    temperature and the framing; the reference log-probs of the unframed queries, or at temperature 1, differ."""
    hparams = policy_hparams(tmp_path, letter_e_reward_model, **{
        "task.policy.temperature": 0.6, "task.query_prefix": "say ", "task.query_suffix": " now"})
    queries = np.random.RandomState(3).randint(0, 27, (32, 4)).astype(np.int32)
    with tf.Graph().as_default():
        trainer = demo_trainer(hparams, letter_e_reward_model)
        rollout = trainer.sess.run(trainer.rollout_op, {trainer.queries: queries, trainer.rollout_seed: [3, 4]})
        feed = {trainer.queries: queries, trainer.responses: rollout["responses"]}
        ref_logprobs = trainer.sess.run(trainer.ref_logprobs_op, feed)
        demo = TrainedModel("demo")  # the reference policy's own weights, scored otherwise
        others = {"temperature 1": Policy(demo, scope="ref_policy", temperature=1.0,
                                          embed_queries=lm_tasks.query_formatter(hparams.task, trainer.encoder)),
                  "unframed": Policy(demo, scope="ref_policy", temperature=0.6)}
        other_logprobs = {name: trainer.sess.run(policy.analyze_responses_op(trainer.queries, trainer.responses)[
            "logprobs"], feed) for name, policy in others.items()}
    np.testing.assert_allclose(ref_logprobs, rollout["logprobs"], atol=1e-5)
    for name, logprobs in other_logprobs.items():
        assert np.abs(logprobs - ref_logprobs).max() > 0.1, name


def test_unfinished_responses_get_the_penalty_and_are_truncated_before_scoring(tmp_path, letter_e_reward_model):
    hparams = policy_hparams(tmp_path, letter_e_reward_model, **{
        "task.truncate_token": E, "task.truncate_after": 3, "task.penalty_reward_value": -7,
        "ppo.total_episodes": 32})
    task = hparams.task
    with tf.Graph().as_default():
        trainer = demo_trainer(hparams, letter_e_reward_model)
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
        trainer = demo_trainer(hparams, reward_model)
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


def test_a_2019_reward_model_is_loaded_from_its_reward_model_scope(tmp_path):
    """2019's train_reward saved every variable of its graph, so a released reward model's checkpoint also holds the
    ref_policy it sampled with (another GPT-2 under ref_policy/model/...). PPO must score with the reward_model/
    weights: the policy's reward_model_source names that scope rather than guessing (two models in one checkpoint
    would be refused as ambiguous)."""
    from lm_human_preferences import rewards
    from lm_human_preferences.language.model import Model
    from lm_human_preferences.policy import Policy
    model_dir = str(tmp_path / "reward_model")
    os.makedirs(os.path.join(model_dir, "checkpoints"))
    model = TrainedModel("test")
    with tf.Graph().as_default():
        Policy(model, scope="ref_policy")
        with tf.variable_scope("reward_model"):
            Model(model.hparams(), scalar_heads=["reward"], scope="model")(tf.zeros([1, 1], tf.int32))
            tf.get_variable("reward_norm/gain", shape=())
            tf.get_variable("reward_norm/bias", shape=())
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            # random weights that differ from both the initialisers and the built-in model's
            saved = random_values(tf.global_variables(), sess, seed=3)
            tf.train.Saver().save(sess, os.path.join(model_dir, "checkpoints", "model.ckpt"), global_step=7,
                                  write_meta_graph=False)
    trained_models.write_model_files(model_dir, model.hparams(), "test")
    hparams = experiments.resolve_hparams("train_policy", "test", "run", save_dir=str(tmp_path), overrides={
        "rewards.train_new_model": "off", "rewards.trained_model": model_dir})
    source = train_policy.reward_model_source(hparams, str(tmp_path / "run"), resume=False)
    with tf.Graph().as_default():
        reward_model = rewards.RewardModel(source)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            loaded = {v.op.name: sess.run(v) for v in reward_model.get_params()}
    assert sorted(loaded) == sorted(name for name in saved if name.startswith("reward_model/"))
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)


_two_rank_runs = {}


def two_rank_run(allreduce, tmp_path_factory):
    """A 2-rank train_policy run (reward model trained first) through the gradient all-reduce `allreduce`, run
    once per test session: (its output, its run directory)."""
    env = allreduce_env(allreduce)
    if allreduce not in _two_rank_runs:
        save_dir = tmp_path_factory.mktemp(f"two_ranks_{allreduce}")
        # 16 episodes per update: each rank's minibatch holds the 8 that reward whitening needs
        result = run_cli("launch.py", "train_policy", "test", "two", "--mpi", "2", "--save_dir", str(save_dir),
                         "--ppo.batch_size", "16", "--ppo.total_episodes", "32", env=env)
        _two_rank_runs[allreduce] = result, save_dir / "two"
    return _two_rank_runs[allreduce]


def checkpoint_values(checkpoint_dir):
    reader = tf.train.load_checkpoint(str(checkpoint_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


@pytest.mark.parametrize("allreduce", ["mpi4py", "horovod"])
def test_two_ranks_complete_with_identical_parameters(tmp_path_factory, allreduce):
    result, run_dir = two_rank_run(allreduce, tmp_path_factory)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"gradient all-reduce: {allreduce} across 2 ranks" in result.stdout
    assert "reward_model parameters identical on all 2 ranks" in result.stdout
    assert "policy parameters identical on all 2 ranks" in result.stdout
    assert os.path.exists(os.path.join(run_dir, "policy", "checkpoints", "checkpoint"))


def test_horovod_and_mpi4py_train_the_same_policy(tmp_path_factory):
    """The same 2-rank job (same seeds, so the same rollouts and shuffles) through either all-reduce ends with the
    same reward model and policy, to float tolerance (the two sum in different orders)."""
    runs = {name: two_rank_run(name, tmp_path_factory) for name in ("horovod", "mpi4py")}
    for result, _ in runs.values():
        assert result.returncode == 0, result.stdout[-3000:]
    for scope in ("reward_model", "policy"):
        horovod, mpi4py = (checkpoint_values(run_dir / scope / "checkpoints") for _, run_dir in runs.values())
        assert horovod.keys() == mpi4py.keys() and len(horovod) > 10
        for name in horovod:
            np.testing.assert_allclose(horovod[name], mpi4py[name], rtol=2e-4, atol=2e-5, err_msg=f"{scope}: {name}")


# ----- the 2019 run: its length, logs, checkpoints and recorded hyperparameters -------------------------------------

def run_hparams(tmp_path, name="run", **overrides):
    """The hyperparameters of a train_policy run of the `test` experiment in TMP_PATH/NAME."""
    return experiments.resolve_hparams("train_policy", "test", name, save_dir=str(tmp_path), overrides=overrides)


def update_lines(printed):
    """The console's line for each update ("update 3/5 | objective/score ... | eta 1m40s")."""
    return [line for line in printed.splitlines() if line.startswith("update ")]


def test_run(tmp_path, name="run", resume=False, **overrides):
    """A train_policy run of the `test` experiment (it trains its tiny reward model first)."""
    hparams = run_hparams(tmp_path, name, **overrides)
    with tf.Graph().as_default():
        train_policy.train(hparams, resume=resume)
    return hparams.run.save_dir


test_run.__test__ = False  # a helper, not a test


def test_the_number_of_updates_is_rounded_up_and_logs_start_at_step_0(tmp_path, capsys):
    save_dir = test_run(tmp_path, **{"ppo.total_episodes": 20, "ppo.batch_size": 8,  # 2.5 batches: 3 updates
                                     "run.log_interval": 2})
    # the console counts updates from 1 to the total, each line with the numbers a researcher watches
    printed = capsys.readouterr().out
    lines = update_lines(printed)
    assert [line.split(" | ")[0] for line in lines] == ["update 1/3", "update 2/3", "update 3/3"], lines
    assert all(f"| {key} " in lines[0] for key in ("objective/score", "objective/kl", "objective/kl_coef")), lines
    # 3 samples after every run.log_interval-th update, from the first: after updates 1 and 3, not 2
    after = [part.count("\nquery:    ") for part in printed.split("\nupdate ")[1:]]
    assert after == [3, 0, 3], printed
    assert f"\nsaved the policy to {os.path.join(save_dir, 'policy')}\n" in printed, printed[-400:]
    ppo_events = stats.read_scalars(os.path.join(save_dir, "tb", "ppo"))
    assert [step for step, _ in ppo_events["elapsed/updates"]] == [0, 1, 2]
    assert [value for _, value in ppo_events["elapsed/updates"]] == [1, 2, 3]
    assert [value for _, value in ppo_events["elapsed/steps/serial"]] == [4, 8, 12]  # response_length 4
    assert [value for _, value in ppo_events["elapsed/steps/total"]] == [32, 64, 96]  # x batch_size 8
    assert [value for _, value in ppo_events["elapsed/episodes"]] == [8, 16, 24]
    # each update's speed is over its own time: from the previous update's logged elapsed/time (the first from
    # the start, elapsed/time 0) to its own
    update_times = np.diff([0.0] + [value for _, value in ppo_events["elapsed/time"]])
    np.testing.assert_allclose([v for _, v in ppo_events["elapsed/episodes_per_second"]], 8 / update_times, rtol=1e-3)
    np.testing.assert_allclose([v for _, v in ppo_events["elapsed/fps"]], 8 * 4 / update_times, rtol=1e-3)
    # the learning rate anneals to 0 over the 3 updates
    np.testing.assert_allclose([v for _, v in ppo_events["objective/lr"]], [1e-3, 1e-3 * 2 / 3, 1e-3 / 3], rtol=1e-6)
    assert tf.train.latest_checkpoint(os.path.join(save_dir, "policy", "checkpoints")).endswith("model.ckpt-3")
    # the documented tags: 2019's, and ours (objective/lr, elapsed/episodes_per_second, time/* per stage)
    assert sorted(ppo_events) == sorted([
        *(f"objective/{k}" for k in ("kl", "kl_coef", "entropy", "score", "score_total", "lr")),
        *(f"ppo/loss/{k}" for k in ("policy", "value", "total")),
        *(f"ppo/policy/{k}" for k in ("entropy", "approxkl", "clipfrac")),
        "ppo/returns/mean", "ppo/returns/var",
        *(f"ppo/val/{k}" for k in ("vpred", "error", "clipfrac", "mean", "var", "var_explained")),
        *(f"elapsed/{k}" for k in ("updates", "episodes", "fps", "time", "steps/serial", "steps/total",
                                   "episodes_per_second")),
        *(f"time/{k}" for k in ("rollout", "ref_logprobs", "score", "ppo_epochs", "stats"))])
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


def test_recording_the_reward_model_used_leaves_the_runs_own_hyperparameters_as_they_were(tmp_path):
    hparams = run_hparams(tmp_path)
    before = hparams.to_nested_dict()
    assert before["rewards"]["trained_model"] is None  # the `test` experiment trains its reward model first
    recorded = train_policy.saved_hparams(hparams)
    assert recorded.rewards.trained_model == os.path.join(hparams.run.save_dir, "reward_model")
    assert hparams.to_nested_dict() == before


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    save_dir = test_run(tmp_path, **{"ppo.total_episodes": 8})
    checkpoints = os.path.join(save_dir, "policy", "checkpoints")
    before = {name: os.path.getmtime(os.path.join(checkpoints, name)) for name in os.listdir(checkpoints)}
    capsys.readouterr()
    test_run(tmp_path, resume=True, **{"ppo.total_episodes": 8})
    printed = capsys.readouterr().out
    assert f"resuming: the reward model in {os.path.join(save_dir, 'reward_model')} is trained" in printed, printed
    assert f"the run in {save_dir} had finished all 1 updates; nothing to resume" in printed, printed
    assert {name: os.path.getmtime(os.path.join(checkpoints, name)) for name in os.listdir(checkpoints)} == before


def test_policy_runs_keep_the_last_20_checkpoints_of_the_policy_alone(tmp_path):
    save_dir = test_run(tmp_path, **{"ppo.total_episodes": 8 * 23, "run.save_interval": 1, "run.log_interval": 100})
    checkpoints = os.path.join(save_dir, "policy", "checkpoints")
    kept = sorted(int(name.split("-")[1].split(".")[0]) for name in os.listdir(checkpoints) if name.endswith(".index"))
    assert kept == list(range(4, 24)), kept
    # each holds the policy's weights only: not the reference policy, the reward model or Adam's slots, which
    # would make every one of the 20 several times the size (Adam's state for --resume is in resume/ppo)
    names = [name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(checkpoints))]
    assert names and all(name.startswith("policy/") and "Adam" not in name for name in names), names


def fail_in_update(tmp_path, monkeypatch, failing, **overrides):
    """test_run failing in update index `failing` (counting from 0), as when the GPU goes away."""
    real_update = train_policy.PPOTrainer.update

    def failing_update(self, queries, update_index):
        if update_index == failing:
            raise RuntimeError("the GPU fell off")
        return real_update(self, queries, update_index)

    monkeypatch.setattr(train_policy.PPOTrainer, "update", failing_update)
    with pytest.raises(RuntimeError, match="the GPU fell off"):
        test_run(tmp_path, **overrides)
    monkeypatch.setattr(train_policy.PPOTrainer, "update", real_update)


@pytest.mark.parametrize("failing", [2, 0])
def test_a_run_that_fails_after_training_started_saves_where_it_was(tmp_path, monkeypatch, capsys, failing):
    fail_in_update(tmp_path, monkeypatch, failing, **{"ppo.total_episodes": 8 * 5, "run.save_interval": 100})
    checkpoints = os.path.join(tmp_path, "run", "policy", "checkpoints")
    # the updates that finished (none when the first one failed: the initial policy, as step 0)
    assert tf.train.latest_checkpoint(checkpoints).endswith(f"model.ckpt-{failing}")
    assert f"training stopped by an error after {failing} updates; saving a checkpoint" in capsys.readouterr().out


def test_a_resumed_runs_progress_bar_and_tensorboard_count_on_from_where_it_resumed(tmp_path, monkeypatch,
                                                                                     fake_terminal, capsys):
    """A run that failed in update 4 of 5 resumes from its periodic save after 2 (an error does not rewrite the
    resume state): its bar (drawn only when stderr is a terminal) goes from 2/5 to 5/5, not over 3 alone, its
    console's time left is reckoned from the updates of this session only, and TensorBoard holds each update once
    (what the failed run logged for update 3 is void: it ran again)."""
    overrides = {"ppo.total_episodes": 8 * 5, "run.save_interval": 2}
    fail_in_update(tmp_path, monkeypatch, 3, **overrides)
    # what it resumes from: the save after update 2, named by its step (so writing it never touches the files of
    # the save before it), with the update count and the KL coefficient in use (fixed in `test`: 0.1)
    state_dir = os.path.join(tmp_path, "run", "resume", "ppo")
    assert tf.train.latest_checkpoint(state_dir) == os.path.join(state_dir, "state.ckpt-2")
    state = tf.train.load_checkpoint(state_dir)
    assert state.get_tensor("run_state_ppo/update") == 2
    logged_kl_coef = stats.read_scalars(os.path.join(tmp_path, "run", "tb", "ppo"))["objective/kl_coef"]
    assert state.get_tensor("run_state_ppo/kl_coef") == pytest.approx(logged_kl_coef[2][1]) == pytest.approx(0.1)
    # the error still saved the policy where it stopped, though a periodic save had come before it
    checkpoints = os.path.join(tmp_path, "run", "policy", "checkpoints")
    assert tf.train.latest_checkpoint(checkpoints).endswith("model.ckpt-3")
    capsys.readouterr()
    # the resumed run's time.time(): 100 s later at each call, from a real clock's size (from 0, a sum of two times
    # would pass for their difference)
    clock = iter(range(1_700_000_000, 1_800_000_000, 100))
    monkeypatch.setattr(train_policy, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    terminal = fake_terminal()
    test_run(tmp_path, resume=True, **overrides)
    bars = terminal.bars("ppo")
    assert "| 2/5 [" in bars[0] and "| 5/5 [" in bars[-1], bars
    # each update took 100 s, so after update 3 two are left (200 s), after 4 one, after 5 none
    lines = update_lines(capsys.readouterr().out)
    assert [(line.split(" | ")[0], line.rsplit(" | eta ", 1)[1]) for line in lines] == [
        ("update 3/5", "3m20s"), ("update 4/5", "1m40s"), ("update 5/5", "0s")], lines
    for tag, logged in stats.read_scalars(os.path.join(tmp_path, "run", "tb", "ppo")).items():
        assert [step for step, _ in logged] == [0, 1, 2, 3, 4], (tag, logged)


def test_ppo_trains_on_the_tasks_query_stream_for_the_runs_seed(tmp_path, monkeypatch):
    """The `test` dataset is endless and seeded: a run with run.seed 5 answers the stream of seed 5 in order, and
    draws its rollouts and minibatch shuffles with seed 5."""
    seen, seeds = [], set()
    real_update = train_policy.PPOTrainer.update

    def recording_update(self, queries, update_index):
        seen.append(queries)
        seeds.add(self.seed)  # what the rollouts and shuffles are drawn with
        return real_update(self, queries, update_index)

    monkeypatch.setattr(train_policy.PPOTrainer, "update", recording_update)
    overrides = {"ppo.total_episodes": 16, "ppo.batch_size": 8, "run.seed": 5}
    test_run(tmp_path, **overrides)
    hparams = run_hparams(tmp_path, **overrides)
    encoder = TrainedModel(hparams.task.policy.initial_model).encoding.get_encoder()
    stream = lm_tasks.query_batches(hparams.task, encoder, 8, mode="train", seed=5, rank=0, size=1)
    assert len(seen) == 2 and seeds == {5}
    for queries in seen:
        np.testing.assert_array_equal(queries, next(stream))


def test_each_rank_samples_and_shuffles_its_own_episodes_the_same_way_each_time(tmp_path, letter_e_reward_model,
                                                                                 monkeypatch):
    """An update's rollout and its minibatch shuffles are drawn from (run seed, rank, update index) alone: the same
    rank and update draw the same responses and minibatches again (what a resumed run relies on), while another
    rank draws other responses to the very same queries and shuffles them in another order, as each 2019 rank had a
    seed of its own (run.seed + rank · 100003); another run seed does too, and another update draws other
    responses and shuffles in another order."""
    hparams = policy_hparams(tmp_path, letter_e_reward_model, **{"ppo.total_episodes": 64, "ppo.noptepochs": 1})
    queries = np.random.RandomState(2).randint(0, 27, (32, 4)).astype(np.int32)  # 32 distinct rows
    assert len({tuple(row) for row in queries}) == 32
    with tf.Graph().as_default():
        trainer = demo_trainer(hparams, letter_e_reward_model, seed=5)
        initial = trainer.sess.run(trainer.policy.get_params())
        fed = []
        real_step = trainer.optimizer.step
        trainer.optimizer.step = lambda sess, feeds, *args, **kwargs: fed.append(
            np.concatenate([feed[trainer.queries] for feed in feeds])) or real_step(sess, feeds, *args, **kwargs)

        def update(update_index):
            """(responses, the query indices in the order the minibatches fed them) of one update from the initial
            policy (an update trains the policy, so each starts from the same weights)."""
            for variable, value in zip(trainer.policy.get_params(), initial):
                variable.load(value, trainer.sess)
            fed.clear()
            responses = trainer.update(queries, update_index)[1]["responses"]
            order = [int(np.flatnonzero((queries == row).all(axis=1))[0]) for row in np.concatenate(fed)]
            assert sorted(order) == list(range(32))  # one epoch: every episode once
            return responses, order

        responses, order = update(0)
        again, order_again = update(0)
        next_update, next_update_order = update(1)
        trainer.seed = 6  # what restore() sets from a saved run
        other_seed, other_seed_order = update(0)
        trainer.seed = 5
        monkeypatch.setattr(train_policy.mpi, "rank", lambda: 1)
        other_rank, other_order = update(0)
    np.testing.assert_array_equal(again, responses)
    assert order_again == order
    for other in (next_update, other_rank, other_seed):  # most of the 32 responses of 8 tokens differ
        assert (other != responses).any(axis=1).mean() > 0.5, (responses, other)
    assert other_order != order and other_seed_order != order and next_update_order != order


def test_a_sigterm_in_an_update_stops_the_run_after_it_with_its_state_saved(tmp_path, monkeypatch, capsys):
    """A SIGTERM that arrives during update 3 of 5 (index 2) lets that update finish, saves the policy and the
    resume state after it, and stops with a message naming the update, the total and where the state is; --resume
    then does the last 2 updates. (tests/test_resume.py checks the same through launch.py in a subprocess, and
    that the resumed run ends where an uninterrupted one ends.)"""
    overrides = {"ppo.total_episodes": 8 * 5, "run.save_interval": 100, "run.log_interval": 100}
    real_update = train_policy.PPOTrainer.update

    def update_then_sigterm(self, queries, update_index):
        result = real_update(self, queries, update_index)
        if update_index == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler ending the job
        return result

    monkeypatch.setattr(train_policy.PPOTrainer, "update", update_then_sigterm)
    save_dir = os.path.join(tmp_path, "run")
    message = (f"interrupted: train_policy stopped after update 3 of 5; its state is saved in "
               f"{os.path.join(save_dir, 'resume')}. Continue it with the same command and --resume.")
    with pytest.raises(RunInterrupted) as stopped:
        test_run(tmp_path, **overrides)
    assert str(stopped.value) == message
    monkeypatch.setattr(train_policy.PPOTrainer, "update", real_update)
    state_dir = os.path.join(save_dir, "resume", "ppo")
    assert tf.train.latest_checkpoint(state_dir) == os.path.join(state_dir, "state.ckpt-3")
    assert tf.train.load_checkpoint(state_dir).get_tensor("run_state_ppo/update") == 3
    checkpoints = os.path.join(save_dir, "policy", "checkpoints")
    assert tf.train.latest_checkpoint(checkpoints).endswith("model.ckpt-3")
    printed = capsys.readouterr().out
    assert "received SIGTERM" in printed and "training stopped by an error" not in printed, printed
    assert [line.split(" | ")[0] for line in update_lines(printed)] == [
        "update 1/5", "update 2/5", "update 3/5"]
    test_run(tmp_path, resume=True, **overrides)
    printed = capsys.readouterr().out
    assert "resuming after update 3 of 5" in printed, printed
    assert [line.split(" | ")[0] for line in update_lines(printed)] == [
        "update 4/5", "update 5/5"]
    assert tf.train.latest_checkpoint(checkpoints).endswith("model.ckpt-5")


def test_a_run_resumed_while_its_reward_model_was_training_resumes_that_training(tmp_path, monkeypatch, capsys):
    """A policy run that trains its reward model first and is killed inside that training (after the reward
    model's periodic save) continues the reward model's training on --resume rather than starting it again."""
    overrides = {"ppo.total_episodes": 8, "rewards.train_new_model.run.save_interval": 1}
    real_train_step = train_reward._train_step

    def crash_in_step_1(training, hparams, logger, train_labels, valid_labels, step, num_steps, **kwargs):
        if step == 1:
            raise RuntimeError("preempted")
        real_train_step(training, hparams, logger, train_labels, valid_labels, step, num_steps, **kwargs)

    monkeypatch.setattr(train_reward, "_train_step", crash_in_step_1)
    with pytest.raises(RuntimeError, match="preempted"):
        test_run(tmp_path, **overrides)
    monkeypatch.setattr(train_reward, "_train_step", real_train_step)
    capsys.readouterr()
    test_run(tmp_path, resume=True, **overrides)
    printed = capsys.readouterr().out
    assert "resuming the reward model after step 1 of 2" in printed, printed
    assert tf.train.latest_checkpoint(os.path.join(tmp_path, "run", "policy", "checkpoints")).endswith("model.ckpt-1")


def test_a_failure_while_saving_is_not_followed_by_a_second_save(tmp_path, monkeypatch):
    calls = []

    def failing_save(self, save_dir, step, state=True, policy=True):
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
    hparams = experiments.resolve_hparams("train_policy", "test", "x", overrides=overrides)
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
        trainer = demo_trainer(hparams, letter_e_reward_model)
        queries = np.random.RandomState(0).randint(0, 27, (32, 4)).astype(np.int32)
        trainer.update(queries, 0)
        _, details = trainer.update(queries, 1)  # the second: in the first the policy is still the reference (KL 0)
    capsys.readouterr()
    train_policy.log_samples(encoder, queries, details, count=32)
    printed = capsys.readouterr().out
    cut = lm_tasks.postprocess_responses(details["responses"], hparams.task, 27)
    assert not np.array_equal(cut, details["responses"]), "some responses should have been cut"
    assert np.abs(details["kl"]).max() > 0.01, details["kl"]  # so that the total's sign of the KL term is seen
    lines = printed.splitlines()
    assert [lines[i + 1][:10] for i, line in enumerate(lines) if line == "=" * 80] == ["query:    "] * 32, printed
    for i in range(32):
        total = details["scores"][i] - 0.5 * details["kl"][i]
        assert f"response: {encoder.decode(cut[i])!r}\n  score = {details['scores'][i]:+.3f}\n" \
               f"  kl = {details['kl'][i]:+.3f}\n  total = {total:+.3f}" in printed
    # by default the first 3 episodes, as 2019 printed
    train_policy.log_samples(encoder, queries, details)
    printed = capsys.readouterr().out
    assert printed.count("query:    ") == printed.count("response: ") == 3, printed
    assert f"response: {encoder.decode(cut[2])!r}\n" in printed, printed


def test_a_gs_save_directory_holds_the_whole_run_and_samples_from_there(tmp_path, gcs_bucket, monkeypatch):
    """2019 saved runs to gs://: written locally, uploaded after each save (a real Cloud Storage emulator)."""
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    save_dir = test_run(f"{gcs_bucket}/runs", **{"ppo.total_episodes": 16, "run.save_interval": 1})
    assert save_dir == f"{gcs_bucket}/runs/run"
    from google.cloud import storage
    names = {blob.name for blob in storage.Client.create_anonymous_client().list_blobs(gcs_bucket[len("gs://"):])}
    for name in ("train_policy_hparams.json", "train_reward_hparams.json", "labels.json", "reward_model/encoding",
                 "reward_model/checkpoints/checkpoint", "reward_model/checkpoints/model.ckpt.index",
                 "policy/hparams.json", "policy/checkpoints/checkpoint", "policy/checkpoints/model.ckpt-2.index",
                 "learning_curves.png"):  # drawn when the run ends, after its last checkpoint's upload
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


# ----- the wiring of one PPO update (docs/algorithms.md, steps 1-6), checked against references computed here ------

class RecordingSession:
    """Stands in for a trainer's session and keeps every run as (fetches, feed_dict, result)."""

    def __init__(self, sess):
        self.sess, self.calls = sess, []

    def run(self, fetches, feed_dict=None):
        result = self.sess.run(fetches, feed_dict)
        self.calls.append((fetches, dict(feed_dict or {}), result))
        return result


def np_truncate(responses, truncate_token, truncate_after, padding_token):
    """The task's post-processing written out: each response cut after its first truncate_token at an index
    >= truncate_after (padding after it). Returns (cut responses, whether each response had such a token)."""
    cut, ends = responses.copy(), np.zeros(len(responses), bool)
    for i, response in enumerate(responses):
        for t in range(truncate_after, len(response)):
            if response[t] == truncate_token:
                cut[i, t + 1:] = padding_token
                ends[i] = True
                break
    return cut, ends


def episode_rows(trainer, record, micro_runs):
    """The rollout index of each episode fed to the given micro-batch runs, in order, found by its row of
    sampled log-probs (the values are no use: the demo model's value head starts at 0)."""
    rollout_logprobs = record["rollout"]["logprobs"]
    rows = []
    for _, feed, _ in micro_runs:
        for fed in feed[trainer.logprobs]:
            found = np.flatnonzero((rollout_logprobs == fed).all(axis=1))
            assert len(found) == 1, "every fed episode is exactly one episode of the rollout"
            rows.append(found[0])
    return np.array(rows)


WIRING = dict(updates=3, batch=32, nminibatches=2, noptepochs=3, micro_batches=2, lr=3e-3, kl_coef=0.37,
              target=1.0, horizon=100, truncate_after=3, penalty=-7.0)


@pytest.fixture(scope="module")
def recorded_updates(tmp_path_factory, letter_e_reward_model):
    """WIRING's 3 PPO updates of the demo model (responses end at an e; adaptive KL; 3 epochs of 2 minibatches of
    2 micro-batches) with every session run, every KL controller update and Adam's step counter recorded; and
    the references: the reference policy's log-probs of each rollout and the reward model's scores of the
    responses cut here by `np_truncate`, both run by this fixture (those models are frozen). Last, one Adam step
    fed lr 0 (`params_moved_at_lr_0`)."""
    w = WIRING
    hparams = policy_hparams(tmp_path_factory.mktemp("wiring"), letter_e_reward_model, **{
        "task.truncate_token": E, "task.truncate_after": w["truncate_after"], "task.penalty_reward_value": w["penalty"],
        "ppo.total_episodes": w["batch"] * w["updates"], "ppo.batch_size": w["batch"],
        "ppo.nminibatches": w["nminibatches"], "ppo.noptepochs": w["noptepochs"],
        "ppo.micro_batches": w["micro_batches"], "ppo.lr": w["lr"], "rewards.kl_coef": w["kl_coef"],
        "rewards.adaptive_kl": "on", "rewards.adaptive_kl.target": w["target"],
        "rewards.adaptive_kl.horizon": w["horizon"]})
    with tf.Graph().as_default():
        trainer = demo_trainer(hparams, letter_e_reward_model)
        sess = trainer.sess
        beta1_power, = [v for v in trainer.optimizer.variables if v.op.name.endswith("beta1_power")]
        controller_calls = []
        real_controller_update = trainer.kl_controller.update

        def recording_controller_update(current_kl, n_steps):
            controller_calls.append((current_kl, n_steps))
            real_controller_update(current_kl, n_steps)

        trainer.kl_controller.update = recording_controller_update
        records = []
        for update_index in range(w["updates"]):
            queries = np.random.RandomState(update_index).randint(0, 27, (w["batch"], 4)).astype(np.int32)
            record = dict(queries=queries, kl_coef=trainer.kl_controller.value, beta1_before=sess.run(beta1_power))
            trainer.sess = RecordingSession(sess)
            controller_calls.clear()
            record["stats"], record["details"] = trainer.update(queries, update_index)
            record["calls"], trainer.sess = trainer.sess.calls, sess
            record["controller_calls"] = list(controller_calls)
            record["beta1_after"] = sess.run(beta1_power)
            rollout, = [result for fetches, _, result in record["calls"] if fetches is trainer.rollout_op]
            record["rollout"] = rollout
            record["ref_logprobs"] = sess.run(trainer.ref_logprobs_op, {trainer.queries: queries,
                                                                         trainer.responses: rollout["responses"]})
            cut, record["ends"] = np_truncate(rollout["responses"], E, w["truncate_after"], 27)
            record["cut_changed"] = (cut != rollout["responses"]).any(axis=1)
            record["scores_of_cut"], record["scores_of_uncut"] = (
                sess.run(trainer.score_op, {trainer.queries: queries, trainer.scored_responses: responses})
                for responses in (cut, rollout["responses"]))
            records.append(record)
        # one more Adam step, fed lr 0: the parameters must not move if the fed lr is the one Adam uses
        before = sess.run(trainer.policy.get_params())
        feed = {trainer.queries: queries[:16], trainer.responses: rollout["responses"][:16],
                trainer.logprobs: rollout["logprobs"][:16], trainer.values: rollout["values"][:16],
                trainer.advantages: np.ones((16, 8), np.float32), trainer.returns: np.ones((16, 8), np.float32),
                trainer.lr: 0.0}
        for _ in range(w["micro_batches"]):
            sess.run(trainer.optimizer.accumulate_op, feed)
        sess.run(trainer.optimizer.apply_op, {trainer.lr: 0.0})
        moved = [not np.array_equal(a, b) for a, b in zip(before, sess.run(trainer.policy.get_params()))]
        return dict(trainer=trainer, records=records, params_moved_at_lr_0=any(moved))


def expected_scores(record):
    """The reward model's score of each cut response, or the penalty for a response that never ends."""
    return np.where(record["ends"], record["scores_of_cut"], WIRING["penalty"])


def per_response_kl(record):
    """logp − ref_logp summed over each response's tokens: [batch]."""
    return (record["rollout"]["logprobs"].astype(np.float64) - record["ref_logprobs"]).sum(axis=1)


def update_steps(trainer, record):
    """The minibatch steps of one update: [(advantages run, [(accumulate run), ...], apply run), ...], in the
    order they ran; fails unless every step is one advantages run, then its micro-batches, then one apply."""
    kinds = []
    for call in record["calls"]:
        fetches = call[0]
        if isinstance(fetches, list) and fetches and fetches[0] is trainer.advantages_op:
            kinds.append(("advantages", call))
        elif isinstance(fetches, list) and any(f is trainer.optimizer.accumulate_op for f in fetches):
            kinds.append(("accumulate", call))
        elif fetches is trainer.optimizer.apply_op:
            kinds.append(("apply", call))
    pattern = ["advantages"] + ["accumulate"] * WIRING["micro_batches"] + ["apply"]
    per_step = len(pattern)
    assert [k for k, _ in kinds] == pattern * (len(kinds) // per_step), [k for k, _ in kinds]
    return [(kinds[i][1], [c for _, c in kinds[i + 1:i + per_step - 1]], kinds[i + per_step - 1][1])
            for i in range(0, len(kinds), per_step)]


def test_ppo_scores_the_truncated_responses_and_rewards_the_penalised_score(recorded_updates):
    trainer = recorded_updates["trainer"]
    for record in recorded_updates["records"]:
        ends, changed = record["ends"], record["cut_changed"]
        # the batch can tell truncated from raw scoring, and penalised from raw scores
        assert ends.any() and (~ends).any() and (ends & changed).any()
        assert np.abs(record["scores_of_cut"] - record["scores_of_uncut"])[ends & changed].max() > 1e-3
        assert np.abs(record["scores_of_cut"] - WIRING["penalty"])[~ends].min() > 1e-3
        scores = expected_scores(record)
        np.testing.assert_allclose(record["details"]["scores"], scores, rtol=1e-5, atol=1e-5)
        # per-token rewards: -kl_coef·(logp − ref_logp), plus the penalised score at the last token; checked
        # where they enter PPO (the rewards fed to the advantages of each minibatch)
        kl = record["rollout"]["logprobs"].astype(np.float64) - record["ref_logprobs"]
        token_rewards = -record["kl_coef"] * kl
        token_rewards[:, -1] += scores
        for advantages_run, micro_runs, _ in update_steps(trainer, record):
            _, feed, _ = advantages_run
            rows = episode_rows(trainer, record, micro_runs)  # the episodes of this minibatch
            np.testing.assert_allclose(feed[trainer.token_rewards], token_rewards[rows], rtol=1e-5, atol=1e-5)
        logged = record["stats"]
        np.testing.assert_allclose(logged["objective/score"], scores.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logged["objective/kl"], kl.sum(axis=1).mean(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logged["objective/score_total"],
                                   (scores - record["kl_coef"] * kl.sum(axis=1)).mean(), rtol=1e-4, atol=1e-5)
        # the rollouts' entropy as 2019 logged it: minus the sampled tokens' log-probs, summed per response
        np.testing.assert_allclose(logged["objective/entropy"],
                                   -record["rollout"]["logprobs"].astype(np.float64).sum(axis=1).mean(), rtol=1e-5)


def test_the_policy_samples_shown_to_labelers_are_cut_as_ppo_scores_them(recorded_updates):
    """current_policy_samples (what an online run's labelers are shown) gives the policy's responses for the
    stateless seed, post-processed: cut after the first e at index >= truncate_after, with padding after it."""
    trainer = recorded_updates["trainer"]
    queries = recorded_updates["records"][0]["queries"]
    seed = np.array([7, 11], np.int64)
    raw = trainer.sess.run(trainer.rollout_op["responses"], {trainer.queries: queries, trainer.rollout_seed: seed})
    cut, _ = np_truncate(raw, E, WIRING["truncate_after"], 27)
    assert (cut != raw).any(), "some responses are cut"
    np.testing.assert_array_equal(trainer.current_policy_samples(queries, seed), cut)


def test_the_kl_controller_sees_the_mean_kl_per_response_once_every_update(recorded_updates):
    records = recorded_updates["records"]
    assert records[0]["kl_coef"] == WIRING["kl_coef"]
    for update_index, record in enumerate(records):
        kl = per_response_kl(record).mean()  # summed over a response's tokens, averaged over responses
        assert len(record["controller_calls"]) == 1, record["controller_calls"]
        (seen_kl, n_steps), = record["controller_calls"]
        assert n_steps == WIRING["batch"]  # episodes per update, all ranks
        np.testing.assert_allclose(seen_kl, kl, rtol=1e-4, atol=1e-5)
        assert record["stats"]["objective/kl_coef"] == record["kl_coef"]  # the coefficient the rewards used
        if update_index + 1 < len(records):
            error = np.clip(kl / WIRING["target"] - 1, -0.2, 0.2)
            np.testing.assert_allclose(records[update_index + 1]["kl_coef"],
                                       record["kl_coef"] * (1 + error * WIRING["batch"] / WIRING["horizon"]),
                                       rtol=1e-5)


def test_each_update_takes_noptepochs_times_nminibatches_adam_steps_over_the_whole_batch(recorded_updates):
    trainer, w = recorded_updates["trainer"], WIRING
    partitions = []
    for record in recorded_updates["records"]:
        # Adam's own step counter: beta1_power is multiplied by beta1 = 0.9 once per applied step
        adam_steps = np.log(record["beta1_after"] / record["beta1_before"]) / np.log(0.9)
        assert round(adam_steps) == w["noptepochs"] * w["nminibatches"] and abs(adam_steps - round(adam_steps)) < 1e-3
        steps = update_steps(trainer, record)
        assert len(steps) == w["noptepochs"] * w["nminibatches"]
        rollout = record["rollout"]
        minibatches = []
        for advantages_run, micro_runs, _ in steps:
            _, feed, ((advantages, _), _) = advantages_run
            rows = episode_rows(trainer, record, micro_runs)
            assert len(rows) == w["batch"] // w["nminibatches"]
            # the micro-batches hold the episodes whose advantages the step computed, with those advantages
            np.testing.assert_array_equal(feed[trainer.values], rollout["values"][rows])
            np.testing.assert_array_equal(np.concatenate([f[trainer.advantages] for _, f, _ in micro_runs]),
                                          advantages)
            for name, source in (("queries", record["queries"]), ("responses", rollout["responses"]),
                                 ("values", rollout["values"])):
                np.testing.assert_array_equal(np.concatenate([f[getattr(trainer, name)] for _, f, _ in micro_runs]),
                                              source[rows], err_msg=name)
            minibatches.append(rows)
        for epoch in range(w["noptepochs"]):  # every episode in exactly one minibatch of each epoch
            in_epoch = np.concatenate(minibatches[epoch * w["nminibatches"]:(epoch + 1) * w["nminibatches"]])
            np.testing.assert_array_equal(np.sort(in_epoch), np.arange(w["batch"]))
        partitions.extend(frozenset(m) for m in minibatches[::w["nminibatches"]])
    assert len(set(partitions)) == len(partitions), "each epoch shuffles the batch anew"


def test_the_learning_rate_fed_to_adam_anneals_linearly_to_0(recorded_updates):
    trainer, w = recorded_updates["trainer"], WIRING
    for update_index, record in enumerate(recorded_updates["records"]):
        lr = w["lr"] * (w["updates"] - update_index) / w["updates"]  # reaches 0 after the last update
        fed = [feed[trainer.lr] for _, micro_runs, apply_run in update_steps(trainer, record)
               for _, feed, _ in micro_runs + [apply_run]]
        np.testing.assert_allclose(fed, lr, rtol=1e-6)
        np.testing.assert_allclose(record["stats"]["objective/lr"], lr, rtol=1e-6)  # as logged
    assert not recorded_updates["params_moved_at_lr_0"], "Adam uses the fed learning rate"


def test_a_run_steers_kl_coef_by_the_adaptive_rule_after_every_update(tmp_path):
    """The train loop's wiring over a whole run, from its TensorBoard logs and its saved Adam state."""
    updates, batch, target, horizon, kl_coef = 12, 8, 0.1, 80, 0.01
    save_dir = test_run(tmp_path, **{"ppo.total_episodes": batch * updates, "ppo.batch_size": batch,
                                     "ppo.lr": 1e-2, "rewards.kl_coef": kl_coef, "rewards.adaptive_kl": "on",
                                     "rewards.adaptive_kl.target": target, "rewards.adaptive_kl.horizon": horizon,
                                     "run.log_interval": 1000})
    events = stats.read_scalars(os.path.join(save_dir, "tb", "ppo"))
    kl, logged = (np.array([value for _, value in events[tag]]) for tag in ("objective/kl", "objective/kl_coef"))
    assert len(kl) == len(logged) == updates

    def rule(kl_values):
        coefficients = [kl_coef]
        for value in kl_values[:-1]:
            error = min(max(value / target - 1, -0.2), 0.2)
            coefficients.append(coefficients[-1] * (1 + error * batch / horizon))
        return np.array(coefficients)

    np.testing.assert_allclose(logged, rule(kl), rtol=1e-5)
    # the run's KLs make the check tell a KL per response from one per token (response_length 4)
    assert np.abs(rule(kl / 4) / rule(kl) - 1).max() > 0.01
    # the learning rate of update u is lr·(1 − u / updates): it would reach 0 after the last one
    np.testing.assert_allclose([value for _, value in events["objective/lr"]],
                               1e-2 * (updates - np.arange(updates)) / updates, rtol=1e-6)
    # Adam stepped noptepochs (2) × nminibatches (1) times per update: beta1_power = 0.9^(1 + steps)
    saved = tf.train.load_checkpoint(os.path.join(save_dir, "resume", "ppo"))
    np.testing.assert_allclose(saved.get_tensor("optimizer/beta1_power"), 0.9 ** (1 + 2 * updates), rtol=1e-5)


@pytest.mark.parametrize("mixed_precision", [True, False])
def test_every_model_of_a_ppo_run_computes_in_bfloat16_exactly_when_mixed_precision_is_on(tmp_path, mixed_precision):
    """run.mixed_precision: the rollout's sampling, the policy's and the reference policy's scoring of it, the
    reward model and the gradients all multiply in bfloat16 (each graph scope at least its trunk's 4 matmuls per
    layer; a float32 one or two for the heads). Without it, nothing does."""
    hparams = run_hparams(tmp_path, **{"run.mixed_precision": mixed_precision})
    model = TrainedModel(hparams.task.policy.initial_model)
    by_scope = {}
    with tf.Graph().as_default() as graph:
        train_policy.PPOTrainer(hparams, model, model, model.encoding.get_encoder())
        for op in graph.get_operations():
            if op.type in ("MatMul", "BatchMatMulV2"):
                counts = by_scope.setdefault(op.name.split("/")[0], {tf.bfloat16: 0, tf.float32: 0})
                counts[op.get_attr("T")] += 1
    assert {"sample_sequence", "policy_build", "ref_policy_build", "reward_model_build", "gradients"} <= set(by_scope)
    for scope, counts in by_scope.items():
        if mixed_precision:
            assert counts[tf.bfloat16] >= 4 * model.hparams().n_layer and counts[tf.float32] <= 2, (scope, counts)
        else:
            assert counts[tf.bfloat16] == 0 and counts[tf.float32] >= 4 * model.hparams().n_layer, (scope, counts)
