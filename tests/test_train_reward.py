"""Reward-model training (SPEC section 7): learning from labels with a hidden rule, normalisation, bad label
files, save/reload, and a two-rank run equal to a one-process run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import launcher, lm_tasks, rewards, train_reward
from lm_human_preferences.language.trained_models import TrainedModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E = 4  # the `test` encoding's id of "e"
QUERY_LENGTH, RESPONSE_LENGTH = 4, 8


def e_count(tokens):
    return int(np.sum(np.asarray(tokens) == E))


def hidden_rule_labels(label_type, count, seed=0):
    """Records whose judge prefers responses with more e's (a rule the reward model must discover)."""
    rng = np.random.RandomState(seed)

    def response():
        # letters with a varying share of e's, so that the rule has something to see
        p = np.full(26, 1.0)
        p[E] = rng.uniform(0, 12)
        return rng.choice(26, RESPONSE_LENGTH, p=p / p.sum()).tolist()

    records = []
    for _ in range(count):
        query = rng.randint(0, 26, QUERY_LENGTH).tolist()
        if label_type == "best_of_4":
            samples = [response() for _ in range(4)]
            counts = [e_count(s) for s in samples]
            record = {"query": query, **{f"sample{i}": s for i, s in enumerate(samples)},
                      "best": int(np.argmax(counts))}
        elif label_type == "scalar_rating":
            sample = response()
            record = {"query": query, "sample": sample, "score": float(e_count(sample)) / 2 - 1}
        else:
            s0, s1 = response(), response()
            record = {"query": query, "sample0": s0, "sample1": s1,
                      "difference": float(e_count(s1) - e_count(s0)) / 2}
        records.append(record)
    return records


def write_labels(path, records):
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


def reward_hparams(tmp_path, labels_path, label_type="best_of_4", **overrides):
    settings = {
        "task.query_length": QUERY_LENGTH, "task.response_length": RESPONSE_LENGTH,
        "task.policy.initial_model": "demo", "labels.type": label_type, "labels.source": labels_path,
        "labels.num_train": 768, "labels.num_valid": 192, "batch_size": 32, "lr": 2e-3,
        "normalize_before": False, "normalize_after": False, "run.log_interval": 1000,
    }
    settings.update(overrides)
    return launcher.resolve_hparams("train_reward", "test", "run", save_dir=str(tmp_path / "save"),
                                    overrides=settings)


def final_validation(save_dir):
    from lm_human_preferences.utils import stats
    scalars = stats.read_scalars(os.path.join(save_dir, "tb", "reward_model"))
    return {tag[len("train_reward/"):]: values[-1][1] for tag, values in scalars.items()
            if tag.startswith("train_reward/valid/")}


def test_best_of_4_learns_the_hidden_rule(tmp_path):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 960))
    hparams = reward_hparams(tmp_path, labels)
    train_reward.train(hparams)
    valid = final_validation(hparams.run.save_dir)
    # chance is 0.25; a model that found "more e's wins" picks the best of four most of the time
    assert valid["valid/accuracy"] > 0.6, valid
    assert valid["valid/loss"] < np.log(4) - 0.3, valid


@pytest.mark.parametrize("label_type", ["scalar_rating", "scalar_compare"])
def test_scalar_label_types_learn_the_hidden_rule(tmp_path, label_type):
    records = hidden_rule_labels(label_type, 3072)
    labels = write_labels(tmp_path / "labels.json", records)
    hparams = reward_hparams(tmp_path, labels, label_type=label_type,
                             **{"labels.num_train": 2816, "labels.num_valid": 256})
    train_reward.train(hparams)
    valid = final_validation(hparams.run.save_dir)
    records = records[2816:]
    targets = np.array([r["score"] if label_type == "scalar_rating" else r["difference"] for r in records])
    # predicting the mean (no learning) has squared error = the targets' variance
    assert valid["valid/loss"] < 0.5 * targets.var(), (valid, targets.var())
    if label_type == "scalar_compare":
        assert valid["valid/accuracy"] > 0.7, valid


def test_normalize_after_gives_mean_0_std_1_on_fresh_policy_samples(tmp_path):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 128))
    hparams = reward_hparams(tmp_path, labels, **{
        "labels.num_train": 64, "labels.num_valid": 0, "normalize_before": True, "normalize_after": True,
        "normalize_samples": 256, "rollout_batch_size": 64})
    training = train_reward.train(hparams)
    with training.sess.graph.as_default():
        query_batches = lm_tasks.query_batches(hparams.task, TrainedModel("demo").encoding.get_encoder(), 64,
                                               mode="test", seed=99, rank=0, size=1)
        fresh = training.rewards_on_policy_samples(query_batches, 1024, purpose=99)
    mean, std = rewards.mean_and_std_over_ranks(fresh)
    # 1024 fresh samples: the standard error of the mean is ~0.03
    assert abs(mean) < 0.15 and abs(std - 1) < 0.15, (mean, std)


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r[5].pop("best"), "record 5.*best.*missing"),
    (lambda r: r[7].__setitem__("sample2", r[7]["sample2"][:-1]), "record 7.*sample2"),
    (lambda r: r[3]["query"].__setitem__(0, 99), "record 3.*query"),
    (lambda r: r[2].__setitem__("best", 4), "record 2.*best"),
])
def test_bad_label_file_is_rejected_and_nothing_is_written(tmp_path, corrupt, message):
    records = hidden_rule_labels("best_of_4", 64)
    corrupt(records)
    labels = write_labels(tmp_path / "bad.json", records)
    hparams = reward_hparams(tmp_path, labels, **{"labels.num_train": 32, "labels.num_valid": 0})
    with pytest.raises(ValueError, match=message) as error:
        train_reward.train(hparams)
    assert "bad.json" in str(error.value)
    assert not os.path.exists(hparams.run.save_dir)


def test_too_few_labels_is_a_clear_error(tmp_path):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 40))
    hparams = reward_hparams(tmp_path, labels, **{"labels.num_train": 32, "labels.num_valid": 16})
    with pytest.raises(ValueError, match="has 40 labels.*32 \\+ 16 = 48"):
        train_reward.train(hparams)
    assert not os.path.exists(hparams.run.save_dir)


def saved_rewards(model_dir, queries, responses):
    """Rewards of a saved reward model, reloaded into a fresh graph."""
    with tf.Graph().as_default():
        reward_model = rewards.RewardModelTrainer(TrainedModel("reward_model", savedir=model_dir,
                                                               scope="reward_model"))
        op = reward_model.get_rewards_op(tf.constant(queries), tf.constant(responses))
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            return sess.run(op)


def test_save_then_reload_gives_the_same_rewards(tmp_path):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 64))
    hparams = reward_hparams(tmp_path, labels, **{"labels.num_train": 64, "labels.num_valid": 0,
                                                  "normalize_after": True, "normalize_samples": 64,
                                                  "rollout_batch_size": 32})
    training = train_reward.train(hparams)
    rng = np.random.RandomState(3)
    queries = rng.randint(0, 27, (6, QUERY_LENGTH)).astype(np.int32)
    responses = rng.randint(0, 28, (6, RESPONSE_LENGTH)).astype(np.int32)  # 27 = padding
    with training.sess.graph.as_default():
        live = training.sess.run(training.rewards, {training.queries: queries, training.responses: responses})
    for name in ("train_reward_hparams.json", "reward_model/hparams.json", "reward_model/encoding",
                 "reward_model/checkpoints/checkpoint", "reward_model/checkpoints/model.ckpt.index"):
        assert os.path.exists(os.path.join(hparams.run.save_dir, name)), name
    # the state file names the checkpoint relative to its directory: a moved run still loads
    moved = str(tmp_path / "moved")
    os.rename(hparams.run.save_dir, moved)
    reloaded = saved_rewards(os.path.join(moved, "reward_model"), queries, responses)
    np.testing.assert_allclose(reloaded, live, rtol=1e-5, atol=1e-5)


def checkpoint_values(save_dir):
    reader = tf.train.load_checkpoint(os.path.join(save_dir, "reward_model", "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def test_two_ranks_train_the_same_parameters_as_one_process(tmp_path):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 64))
    flags = ["--labels.source", labels, "--labels.num_train", "64", "--batch_size", "16",
             "--task.query_length", str(QUERY_LENGTH), "--task.response_length", str(RESPONSE_LENGTH),
             "--task.policy.initial_model", "demo", "--normalize_before", "off", "--normalize_after", "off"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for name, ranks in (("one", 1), ("two", 2)):
        result = subprocess.run([sys.executable, "launch.py", "train_reward", "test", name, "--mpi", str(ranks),
                                 "--save_dir", str(tmp_path)] + flags, cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
    assert "reward_model parameters identical on all 2 ranks" in result.stdout
    one, two = checkpoint_values(tmp_path / "one"), checkpoint_values(tmp_path / "two")
    assert one.keys() == two.keys() and any("reward_norm" in k for k in one)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=2e-4, atol=2e-5, err_msg=name)


# ----- normalisation and logs as 2019 ---------------------------------------------------------------------------

def test_normalisation_scores_raw_samples_in_whole_rollout_batches(tmp_path):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 32))
    hparams = reward_hparams(tmp_path, labels, **{"labels.num_train": 32, "labels.num_valid": 0,
                                                  "task.truncate_token": E, "task.truncate_after": 1,
                                                  "rollout_batch_size": 32})
    encoder = TrainedModel("demo").encoding.get_encoder()
    training = train_reward.RewardTraining(hparams, TrainedModel("demo"), encoder, train_reward.label_types.get(
        "best_of_4"))
    training.sess.run(training.reward_model.gain.assign(3.0))  # a scale that makes truncation visible
    sampled = []
    real_sample = training.sample
    training.sample = lambda queries, *seed: sampled.append((queries, *real_sample(queries, *seed))) or sampled[-1][1:]
    query_batches = lm_tasks.query_batches(hparams.task, encoder, 32, mode="train", seed=3, rank=0, size=1)
    got = training.rewards_on_policy_samples(query_batches, 40, 1)  # 40 asked with batches of 32: 2 whole batches
    assert len(sampled) == 2 and got.shape == (64,)
    queries = np.concatenate([q for q, _, _ in sampled])
    raw = np.concatenate([r for _, r, _ in sampled])
    cut = np.concatenate([c for _, _, c in sampled])
    assert not np.array_equal(raw, cut)
    on_raw = training.sess.run(training.rewards, {training.queries: queries, training.responses: raw})
    on_cut = training.sess.run(training.rewards, {training.queries: queries, training.responses: cut})
    np.testing.assert_allclose(got, on_raw, rtol=1e-5)
    assert not np.allclose(got, on_cut)


def test_normalisation_starts_from_a_reset_scale_and_reports_each_result(tmp_path, capsys):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 32))
    hparams = reward_hparams(tmp_path, labels, **{
        "labels.num_train": 32, "labels.num_valid": 0, "normalize_samples": 256, "rollout_batch_size": 64,
        "debug_normalize": 64})
    encoder = TrainedModel("demo").encoding.get_encoder()
    training = train_reward.RewardTraining(hparams, TrainedModel("demo"), encoder,
                                           train_reward.label_types.get("best_of_4"))
    model = training.reward_model
    training.sess.run([model.gain.assign(-4.0), model.bias.assign(7.0)])  # far from 1 and 0, and negative
    query_batches = lm_tasks.query_batches(hparams.task, encoder, 64, mode="train", seed=1, rank=0, size=1)
    training.normalize(query_batches, 0.5, 2.0, "before training", (1, 2))
    gain, bias = training.sess.run([model.gain, model.bias])
    assert gain > 0, gain  # as 2019: the raw reward's scale is measured, whatever the scale was
    # measured independently: rewards of fresh samples, with plain numpy
    fresh = [training.sess.run(training.rewards, {training.queries: q, training.responses: training.sample(q, 7, i)[0]})
             for i, q in enumerate(next(query_batches) for _ in range(16))]
    fresh = np.concatenate(fresh)
    assert abs(fresh.mean() - 0.5) < 0.25 and abs(fresh.std() - 2.0) < 0.25, (fresh.mean(), fresh.std())
    printed = capsys.readouterr().out
    assert "after normalising before training: mean" in printed and "on 64 fresh policy samples" in printed


def test_debug_normalize_follows_each_normalisation(tmp_path, capsys):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 32))
    hparams = reward_hparams(tmp_path, labels, **{
        "labels.num_train": 32, "labels.num_valid": 0, "normalize_before": True, "normalize_after": True,
        "normalize_samples": 64, "rollout_batch_size": 32, "debug_normalize": 32})
    train_reward.train(hparams)
    printed = capsys.readouterr().out
    assert printed.index("rewards before training") < printed.index("after normalising before training") \
        < printed.index("rewards after training") < printed.index("after normalising after training"), printed


@pytest.mark.parametrize("label_type, tags", [
    ("best_of_4", ["loss", "error", "accuracy"]),
    ("scalar_rating", ["loss", "error", "label_mean", "label_var", "corr"]),
])
def test_reward_training_logs_the_2019_tags_from_step_0(tmp_path, label_type, tags):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels(label_type, 64))
    hparams = reward_hparams(tmp_path, labels, label_type=label_type,
                             **{"labels.num_train": 32, "labels.num_valid": 16, "batch_size": 8})
    train_reward.train(hparams)
    from lm_human_preferences.utils import stats
    assert os.listdir(os.path.join(hparams.run.save_dir, "tb")) == ["reward_model"]
    events = stats.read_scalars(os.path.join(hparams.run.save_dir, "tb", "reward_model"))
    for tag in tags:
        assert [step for step, _ in events[f"train_reward/minibatch/{tag}"]] == [0, 1, 2, 3], tag
    np.testing.assert_array_equal(events["train_reward/minibatch/error"], events["train_reward/minibatch/loss"])
    np.testing.assert_allclose([v for _, v in events["train_reward/lr"]], [2e-3 * (1 - i / 4) for i in range(4)])
    assert [step for step, _ in events["train_reward/valid/loss"]] == [3]  # the held-out set, at the end
