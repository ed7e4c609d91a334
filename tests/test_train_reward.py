"""Reward-model training (docs/algorithms.md): learning from labels with a hidden rule, normalisation, bad label
files, save/reload, and a two-rank run equal to a one-process run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import experiments, lm_tasks, rewards, train_reward, trainer
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.utils import files, stats

from mpi_programs import allreduce_env

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


def reward_hparams(tmp_path, labels_path, label_type="best_of_4", save_dir=None, **overrides):
    """The test experiment on `labels_path`, run "run" saved in SAVE_DIR `save_dir` (default tmp_path/save)."""
    settings = {
        "task.query_length": QUERY_LENGTH, "task.response_length": RESPONSE_LENGTH,
        "task.policy.initial_model": "demo", "labels.type": label_type, "labels.source": labels_path,
        "labels.num_train": 768, "labels.num_valid": 192, "batch_size": 32, "lr": 2e-3,
        "normalize_before": False, "normalize_after": False, "run.log_interval": 1000,
    }
    settings.update(overrides)
    return experiments.resolve_hparams("train_reward", "test", "run", save_dir=save_dir or str(tmp_path / "save"),
                                       overrides=settings)


def final_validation(save_dir):
    scalars = stats.read_scalars(os.path.join(save_dir, "tb", "reward_model"))
    return {tag[len("train_reward/"):]: values[-1][1] for tag, values in scalars.items()
            if tag.startswith("train_reward/valid/")}


def test_best_of_4_learns_the_hidden_rule(tmp_path):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 960))
    hparams = reward_hparams(tmp_path, labels)
    train_reward.train(hparams)
    valid = final_validation(hparams.run.save_dir)
    # Chance is 0.25 (loss ln 4 = 1.39). Measured over 5 seeds (labels seed s, run.seed s + 1, s = 0..4): accuracy
    # 0.864 ± 0.024 (0.823-0.885), loss 0.379 ± 0.041 (0.330-0.428). Thresholds at mean ∓ 4 sd.
    assert valid["valid/accuracy"] > 0.76, valid
    assert valid["valid/loss"] < 0.55, valid


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
    # Predicting the mean (no learning) has squared error = the targets' variance. Measured over 5 seeds (labels
    # seed s, run.seed s + 1, s = 0..4), loss / variance: scalar_rating 0.094 ± 0.038 (0.041-0.134), with
    # correlation 0.953 ± 0.019 (0.933-0.979); scalar_compare 0.0033 ± 0.0006 (0.0024-0.0040), with the sign of
    # every decided pair right. Thresholds at mean ± 4 sd (sign errors would need a residual of 9 rms: none).
    if label_type == "scalar_rating":
        assert valid["valid/loss"] < 0.25 * targets.var(), (valid, targets.var())
        assert valid["valid/corr"] > 0.87, valid
    else:
        assert valid["valid/loss"] < 0.006 * targets.var(), (valid, targets.var())
        assert valid["valid/accuracy"] > 0.99, valid


def test_normalisation_gives_the_target_scale_on_fresh_samples_from_any_starting_gain_and_bias(
        tmp_path, monkeypatch, capsys):
    """normalize_before reaches the training labels' mean/std, normalize_after mean 0/std 1, measured with plain
    numpy on fresh samples of the initial policy, though gain and bias start far from 1 and 0 (2019 reset them)."""
    num_train, normalize_samples, rollout, fresh_count = 32, 2048, 256, 4096
    records = hidden_rule_labels("scalar_rating", 64)
    rng = np.random.RandomState(5)
    for index, record in enumerate(records):  # training scores N(-1.5, 3); held-out ones elsewhere (not a target)
        record["score"] = float(rng.normal(-1.5, 3.0) if index < num_train else rng.normal(6.0, 0.5))
    train_scores = np.array([r["score"] for r in records[:num_train]])
    labels = write_labels(tmp_path / "labels.json", records)
    hparams = reward_hparams(tmp_path, labels, label_type="scalar_rating", **{
        "labels.num_train": num_train, "labels.num_valid": 64 - num_train, "batch_size": num_train,
        "normalize_before": True, "normalize_after": True, "normalize_samples": normalize_samples,
        "rollout_batch_size": rollout, "debug_normalize": rollout})
    encoder = TrainedModel("demo").encoding.get_encoder()
    # (gain, bias) each normalisation starts from: positive then negative gain (a skipped reset keeps the sign)
    starts = iter([(3.0, -2.0), (-3.0, 2.0)])
    measured = []  # (fresh rewards, gain) after each normalisation
    real_normalize = train_reward.RewardTraining.normalize

    def normalize_from_elsewhere(training, *args, **kwargs):
        model, sess = training.reward_model, training.sess
        if not measured:  # stretch the raw head (raw mean ≈ 2, std ≈ 3) so that mean, std and variance differ
            [head] = [v for v in model.get_params() if v.op.name == "reward_model/model/heads/reward/w"]
            [head_bias] = [v for v in model.get_params() if v.op.name == "reward_model/model/heads/reward/b"]
            sess.run([head.assign(3 * head), head_bias.assign(1.0)])
        gain, bias = next(starts)
        sess.run([model.gain.assign(gain), model.bias.assign(bias)])
        real_normalize(training, *args, **kwargs)
        fresh_batches = lm_tasks.query_batches(hparams.task, encoder, rollout, mode="test", seed=99 + len(measured),
                                               rank=0, size=1)
        fresh = []
        for index in range(fresh_count // rollout):  # purpose 99+: draws that the normalisation never made
            queries = next(fresh_batches)
            responses = training.sample(queries, 99 + len(measured), index)[0]
            fresh.append(sess.run(training.rewards, {training.queries: queries, training.responses: responses}))
        measured.append((np.concatenate(fresh), sess.run(model.gain)))

    monkeypatch.setattr(train_reward.RewardTraining, "normalize", normalize_from_elsewhere)
    train_reward.train(hparams)

    for (fresh, gain), (target_mean, target_std), when in zip(
            measured, [(train_scores.mean(), train_scores.std()), (0.0, 1.0)], ["before training", "after"]):
        # Normalised rewards are t_std (r - m) / s + t_mean, m and s estimated on n = normalize_samples draws; the
        # fresh mean and std estimate the same on m = fresh_count others. Standard errors: of the mean
        # t_std sqrt(1/n + 1/m) (≈ 0.027 t_std), of the std t_std sqrt((kurtosis - 1) / 4 (1/n + 1/m))
        # (≈ 0.016 t_std before training, 0.023 after: these rewards have kurtosis ≈ 2.4, then 3.9).
        both = 1 / normalize_samples + 1 / fresh_count
        kurtosis = np.mean(((fresh - fresh.mean()) / fresh.std()) ** 4)
        mean_error, std_error = target_std * np.sqrt(both), target_std * np.sqrt((kurtosis - 1) / 4 * both)
        assert abs(fresh.mean() - target_mean) < 4 * mean_error, (when, fresh.mean(), target_mean, mean_error)
        assert abs(fresh.std() - target_std) < 4 * std_error, (when, fresh.std(), target_std, std_error)
        assert gain > 0, (when, gain)  # the reward still grows with the head's output, whatever the gain was
    printed = capsys.readouterr().out
    assert "after normalising before training: mean" in printed and f"on {rollout} fresh policy samples" in printed


def test_the_normalisations_sample_consecutive_query_batches_of_the_run_seeds_training_stream(tmp_path,
                                                                                              monkeypatch):
    """normalize_before, its debug check, normalize_after and its check take whole rollout batches one after
    another from the training queries of run.seed, each with its own purpose in the sampling seed."""
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 16))
    seed, rollout = 3, 8
    hparams = reward_hparams(tmp_path, labels, **{
        "labels.num_train": 16, "labels.num_valid": 0, "batch_size": 8, "run.seed": seed, "normalize_before": True,
        "normalize_after": True, "normalize_samples": 12, "debug_normalize": 8, "rollout_batch_size": rollout})
    drawn = []  # (purpose, index, queries) of every sampling call
    real_sample = train_reward.RewardTraining.sample

    def sample(training, queries, purpose, index):
        drawn.append((purpose, index, queries.tolist()))
        return real_sample(training, queries, purpose, index)

    monkeypatch.setattr(train_reward.RewardTraining, "sample", sample)
    train_reward.train(hparams)
    training = train_reward.RewardTraining  # 12 samples are 2 batches of 8 (rounded up to whole batches), 8 are 1
    assert [(purpose, index) for purpose, index, _ in drawn] == [
        (training.NORMALIZE_BEFORE, 0), (training.NORMALIZE_BEFORE, 1), (training.DEBUG_BEFORE, 0),
        (training.NORMALIZE_AFTER, 0), (training.NORMALIZE_AFTER, 1), (training.DEBUG_AFTER, 0)]
    encoder = TrainedModel(hparams.task.policy.initial_model).encoding.get_encoder()
    stream = lm_tasks.query_batches(hparams.task, encoder, rollout, mode="train", seed=seed, rank=0, size=1)
    assert [queries for _, _, queries in drawn] == [next(stream).tolist() for _ in drawn]


def test_a_stop_asked_for_in_the_last_step_saves_the_state_and_the_resumed_run_finishes_it(tmp_path, monkeypatch,
                                                                                          capsys):
    """A SIGTERM during the last step: the run saves its state after all 4 steps and stops with the resume
    message, without a trained model; resumed, it normalises after training and saves the model that an
    uninterrupted run saves."""
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 32))
    overrides = {"labels.num_train": 32, "labels.num_valid": 0, "batch_size": 8, "normalize_after": True,
                 "normalize_samples": 16, "debug_normalize": 0, "rollout_batch_size": 16}
    straight = reward_hparams(tmp_path / "straight", labels, **overrides)
    train_reward.train(straight)
    cut = reward_hparams(tmp_path / "cut", labels, **overrides)
    real_train_step = train_reward._train_step

    def train_step(training, hparams, logger, train_labels, valid_labels, step, num_steps):
        real_train_step(training, hparams, logger, train_labels, valid_labels, step, num_steps)
        if step == num_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler ending the job

    monkeypatch.setattr(train_reward, "_train_step", train_step)
    with pytest.raises(trainer.RunInterrupted, match="stopped after step 4 of 4; its state is saved in "):
        train_reward.train(cut)
    monkeypatch.setattr(train_reward, "_train_step", real_train_step)
    assert not train_reward.is_finished(cut.run.save_dir)
    state_files = os.listdir(os.path.join(cut.run.save_dir, "resume", "reward_model"))
    assert sorted(f for f in state_files if f.endswith(".index")) == ["state.ckpt-4.index"], state_files
    capsys.readouterr()
    train_reward.train(cut, resume=True)
    printed = capsys.readouterr().out
    assert "resuming the reward model after step 4 of 4" in printed and "rewards after training" in printed, printed
    assert_same_reward_model(cut.run.save_dir, straight.run.save_dir)


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


@pytest.mark.parametrize("overrides, message", [
    ({"rollout_batch_size": 8, "batch_size": 12}, "rollout_batch_size=8 must be divisible by the number of MPI ranks"),
    ({"rollout_batch_size": 12, "batch_size": 8}, "^batch_size=8 must be divisible by the number of MPI ranks"),
])
def test_batches_that_the_ranks_cannot_share_are_refused_naming_the_hyperparameter(tmp_path, monkeypatch,
                                                                                   overrides, message):
    """Called from Python under 3 ranks (the command line's preflight says the same before starting them)."""
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 48))
    hparams = reward_hparams(tmp_path, labels, **{"labels.num_train": 48, "labels.num_valid": 0, **overrides})
    monkeypatch.setattr(train_reward.mpi, "size", lambda: 3)
    with pytest.raises(ValueError, match=message + " \\(3\\)"):
        train_reward.train(hparams)
    assert not os.path.exists(hparams.run.save_dir)


def test_a_synthetic_label_set_too_short_for_the_run_is_named_as_such(tmp_path):
    hparams = reward_hparams(tmp_path, None, **{"labels.num_train": 32, "labels.num_valid": 16})
    short = {"query": np.zeros((40, QUERY_LENGTH), np.int32), "best": np.zeros(40, np.int32)}
    with pytest.raises(ValueError, match="^the synthetic label set has 40 labels.*32 \\+ 16 = 48"):
        train_reward.split_labels(short, hparams)


def test_the_training_labels_are_one_shuffle_by_the_run_seed_and_the_held_out_ones_follow_in_file_order(tmp_path):
    """The first num_train records, in the order of numpy's RandomState(run.seed) permutation (so each seed of a
    sweep sees its own order); then the next num_valid records as held out, unshuffled."""
    labels = {"best": np.arange(45)}  # each record stands for its index in the file
    orders = []
    for seed in (1, 2):
        hparams = reward_hparams(tmp_path, None, **{"labels.num_train": 32, "labels.num_valid": 8, "run.seed": seed})
        train, valid = train_reward.split_labels(labels, hparams)
        np.testing.assert_array_equal(train["best"], np.random.RandomState(seed).permutation(32))
        np.testing.assert_array_equal(valid["best"], np.arange(32, 40))
        orders.append(train["best"])
    assert not np.array_equal(*orders)


def saved_rewards(model_dir, queries, responses):
    """Rewards of a saved reward model, reloaded into a fresh graph."""
    with tf.Graph().as_default():
        reward_model = rewards.RewardModel(TrainedModel("reward_model", savedir=model_dir,
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
    # and so does it for TensorFlow's own reader, which follows the state file's path as written
    checkpoints = os.path.join(moved, "reward_model", "checkpoints")
    assert tf.train.latest_checkpoint(checkpoints) == os.path.join(checkpoints, "model.ckpt")


def checkpoint_values(save_dir):
    reader = tf.train.load_checkpoint(os.path.join(save_dir, "reward_model", "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def assert_same_reward_model(save_dir, expected_save_dir):
    """The reward model saved in `save_dir` has the variables of the one in `expected_save_dir`, equal to float
    rounding."""
    expected, got = checkpoint_values(expected_save_dir), checkpoint_values(save_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("allreduce", ["mpi4py", "horovod"])
def test_two_ranks_train_the_same_parameters_as_one_process(tmp_path, allreduce):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **allreduce_env(allreduce))
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 64))
    flags = ["--labels.source", labels, "--labels.num_train", "64", "--batch_size", "16",
             "--task.query_length", str(QUERY_LENGTH), "--task.response_length", str(RESPONSE_LENGTH),
             "--task.policy.initial_model", "demo", "--normalize_before", "off", "--normalize_after", "off"]
    for name, ranks in (("one", 1), ("two", 2)):
        result = subprocess.run([sys.executable, "launch.py", "train_reward", "test", name, "--mpi", str(ranks),
                                 "--save_dir", str(tmp_path)] + flags, cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
    assert f"gradient all-reduce: {allreduce} across 2 ranks" in result.stdout
    assert "reward_model parameters identical on all 2 ranks" in result.stdout
    one, two = checkpoint_values(tmp_path / "one"), checkpoint_values(tmp_path / "two")
    assert one.keys() == two.keys() and any("reward_norm" in k for k in one)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=2e-4, atol=2e-5, err_msg=name)


def test_each_step_trains_on_the_next_batch_of_the_shuffled_labels_so_a_pass_sees_each_label_once(
        tmp_path, monkeypatch):
    """Step s takes training labels s·batch_size to (s+1)·batch_size − 1 (of the run's one shuffle): batch_size
    labels a step, and the pass of num_train / batch_size steps sees every training label exactly once."""
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 40))
    hparams = reward_hparams(tmp_path, labels, **{"labels.num_train": 40, "labels.num_valid": 0, "batch_size": 8})
    fed, real_train_step = [], train_reward.RewardTraining.train_step

    def recording_train_step(self, labels, ids, lr):
        fed.append(np.asarray(ids).tolist())
        return real_train_step(self, labels, ids, lr)

    monkeypatch.setattr(train_reward.RewardTraining, "train_step", recording_train_step)
    train_reward.train(hparams)
    assert fed == [list(range(8 * step, 8 * step + 8)) for step in range(5)], fed


def test_each_rank_draws_its_own_policy_samples_the_same_ones_each_time(tmp_path, monkeypatch):
    """RewardTraining.sample is stateless in (run seed, rank, purpose, index): asked again it returns the same
    responses (what a resumed run relies on), and another rank, purpose or index draws other responses for the
    very same queries (ranks never duplicate one another's samples)."""
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 32))
    hparams = reward_hparams(tmp_path, labels, **{"labels.num_train": 32, "labels.num_valid": 0})
    encoder = TrainedModel("demo").encoding.get_encoder()
    with tf.Graph().as_default():
        training = train_reward.RewardTraining(hparams, TrainedModel("demo"), encoder,
                                               train_reward.label_types.get("best_of_4"), seed=5)
        queries = next(lm_tasks.query_batches(hparams.task, encoder, 32, mode="train", seed=3, rank=0, size=1))
        first = training.sample(queries, training.LABELS, 0)[0]
        np.testing.assert_array_equal(training.sample(queries, training.LABELS, 0)[0], first)
        others = [training.sample(queries, training.LABELS, 1)[0]]
        others.append(training.sample(queries, training.NORMALIZE_BEFORE, 0)[0])
        monkeypatch.setattr(train_reward.mpi, "rank", lambda: 1)
        others.append(training.sample(queries, training.LABELS, 0)[0])
    for other in others:  # most of the 32 responses of 8 tokens differ
        assert (other != first).any(axis=1).mean() > 0.5, (first, other)


def test_the_held_out_metrics_are_means_over_every_held_out_record(tmp_path):
    """RewardTraining.evaluate scores the held-out set in batches of batch_size (37 records: 16, 16 and a short 5)
    and weighs each batch by its records, so each metric is its mean over the records, as if each were scored
    alone (here one at a time, with the same weights)."""
    labels_path = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 53, seed=4))
    hparams = reward_hparams(tmp_path, labels_path, **{"labels.num_train": 16, "labels.num_valid": 37,
                                                        "batch_size": 16})
    model = TrainedModel("demo")
    label_type = train_reward.label_types.get("best_of_4")
    with tf.Graph().as_default():
        training = train_reward.RewardTraining(hparams, model, model.encoding.get_encoder(), label_type, seed=5)
        _, held_out = train_reward.read_labels(labels_path, hparams, label_type, model.encoding)
        got = training.evaluate(held_out)
        fetches = {"loss": training.loss, **training.metrics}
        alone = [training.sess.run(fetches, training.feed(held_out, [i])) for i in range(37)]
    assert sorted(got) == sorted(fetches) and 0 < got["accuracy"] < 1, got
    for name in fetches:
        np.testing.assert_allclose(got[name], np.mean([a[name] for a in alone]), rtol=1e-5, err_msg=name)


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


def test_debug_normalize_follows_each_normalisation(tmp_path, monkeypatch, capsys):
    """Each normalisation is followed by its check on fresh samples: drawn with stateless seeds (purpose, index)
    that no other draw of the run uses, so the check never measures what the normalisation was fitted on."""
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 32))
    hparams = reward_hparams(tmp_path, labels, **{
        "labels.num_train": 32, "labels.num_valid": 0, "normalize_before": True, "normalize_after": True,
        "normalize_samples": 64, "rollout_batch_size": 32, "debug_normalize": 32})
    drawn, real_sample = [], train_reward.RewardTraining.sample

    def recording_sample(self, queries, purpose, index):
        drawn.append((purpose, index))
        return real_sample(self, queries, purpose, index)

    monkeypatch.setattr(train_reward.RewardTraining, "sample", recording_sample)
    train_reward.train(hparams)
    assert len(drawn) == 2 * (2 + 1) and len(set(drawn)) == len(drawn), drawn  # 2 batches of 32, then 1; twice
    printed = capsys.readouterr().out
    assert printed.index("rewards before training") < printed.index("after normalising before training") \
        < printed.index("rewards after training") < printed.index("after normalising after training"), printed
    # each says how many samples it measured: normalize_samples, then debug_normalize (1 rank)
    assert printed.count(" on 64 policy samples; normalised to mean 0.0000, std 1.0000\n") == 2, printed
    assert printed.count(" on 32 fresh policy samples\n") == 2, printed


def test_the_learning_rate_decays_linearly_over_the_pass_as_logged_and_as_applied(tmp_path, monkeypatch):
    """lr (1 - step / steps) at step 0, 1, ... (2019: (1 - start_index / num_train) lr), in TensorBoard and in the
    step Adam takes, which is recovered from the parameters and Adam's own state before and after each step."""
    lr, batch_size, num_steps = 3e-3, 8, 5
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("scalar_rating", batch_size * num_steps))
    hparams = reward_hparams(tmp_path, labels, label_type="scalar_rating", **{
        "labels.num_train": batch_size * num_steps, "labels.num_valid": 0, "batch_size": batch_size, "lr": lr})
    applied = []
    real_train_step = train_reward._train_step

    def train_step_and_recover_the_lr(training, *args):
        # TF1 Adam at step t: p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), with m and v the slots
        # after the step, and b1^t, b2^t the beta powers before it (Adam multiplies them by b1, b2 after).
        optimizer = training.optimizer
        state = {v.op.name: v for v in optimizer.variables}
        slots = [(state[f"{optimizer.scope}/{p.op.name}/Adam"], state[f"{optimizer.scope}/{p.op.name}/Adam_1"])
                 for p in optimizer.params]
        powers = [state[f"{optimizer.scope}/beta1_power"], state[f"{optimizer.scope}/beta2_power"]]
        before, (beta1_power, beta2_power) = training.sess.run([optimizer.params, powers])
        real_train_step(training, *args)
        after, moments = training.sess.run([optimizer.params, slots])
        change = np.concatenate([(b - a).ravel() for b, a in zip(before, after)])
        direction = np.concatenate([(m / (np.sqrt(v) + 1e-5)).ravel() for m, v in moments])
        direction *= np.sqrt(1 - beta2_power) / (1 - beta1_power)
        steady = np.abs(direction) > 0.5 * np.abs(direction).max()  # coordinates whose float32 change is precise
        applied.append(np.median(change[steady] / direction[steady]))

    monkeypatch.setattr(train_reward, "_train_step", train_step_and_recover_the_lr)
    train_reward.train(hparams)
    expected = [lr * (1 - step / num_steps) for step in range(num_steps)]  # 3e-3, 2.4e-3, ..., 0.6e-3
    logged = stats.read_scalars(os.path.join(hparams.run.save_dir, "tb", "reward_model"))["train_reward/lr"]
    assert [step for step, _ in logged] == list(range(num_steps))
    np.testing.assert_allclose([value for _, value in logged], expected, rtol=1e-6)  # float32 in the event file
    np.testing.assert_allclose(applied, expected, rtol=1e-4)


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed before its labels were written"])
def test_the_judges_labels_are_written_into_the_run_directory(tmp_path, monkeypatch, resume):
    """The synthetic judge's labels go to SAVE_DIR/labels.json (nothing in the working directory); a resumed run
    whose labels were never written (killed while labelling) makes them rather than failing to read them. Each
    pick is the judge's (labels.judge) at its noise (labels.judge_temperature), drawn from the run seed's stream."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    temperature, seed = 0.2, 3
    hparams = experiments.resolve_hparams("train_reward", "test", "run", save_dir=str(tmp_path / "save"), overrides={
        "normalize_before": False, "normalize_after": False, "run.log_interval": 1000,
        "labels.judge_temperature": temperature, "run.seed": seed})
    assert hparams.labels.judge == "letter_e"
    train_reward.train(hparams, resume=resume)
    with open(os.path.join(hparams.run.save_dir, "labels.json")) as f:
        records = json.load(f)
    assert len(records) == hparams.labels.num_train + hparams.labels.num_valid
    assert all(sorted(r) == ["best", "query", "sample0", "sample1", "sample2", "sample3"] for r in records), records[0]
    # one record per query of the training stream for seed run.seed + 1, in order, unsplit (rank 0 makes them alone)
    encoder = TrainedModel(hparams.task.policy.initial_model).encoding.get_encoder()
    stream = lm_tasks.query_batches(hparams.task, encoder, 1, mode="train", seed=hparams.run.seed + 1, rank=0, size=1)
    assert [record["query"] for record in records] == [next(stream)[0].tolist() for _ in records]
    # the picks, recomputed: the share of e's in each decoded sample, softmax at the temperature, one draw per
    # record from RandomState(run.seed)
    rng = np.random.RandomState(seed)
    best_of_judge = []
    for record in records:
        texts = [encoder.decode(record[f"sample{i}"]) for i in range(4)]
        scores = np.array([text.lower().count("e") / len(text) if text else 0.0 for text in texts])
        weights = np.exp((scores - scores.max()) / temperature)
        assert record["best"] == rng.choice(4, p=weights / weights.sum()), (record, scores)
        best_of_judge.append(scores[record["best"]] == scores.max())
    assert 0 < sum(best_of_judge) < len(records), best_of_judge  # the noise made the judge pick worse samples too
    assert os.listdir(elsewhere) == []
    assert train_reward.is_finished(hparams.run.save_dir)


def crash_in_step(hparams, monkeypatch, failing, machine_lost=False):
    """train_reward.train(hparams) failing in step `failing` (counting from 0). machine_lost: the machine is gone
    from that moment, so nothing more is uploaded to a gs:// SAVE_DIR (no upload on the way out, as a Python error
    has)."""
    real_train_step, real_sync_up = train_reward._train_step, files.sync_up

    def train_step(training, hparams, logger, train_labels, valid_labels, step, num_steps):
        if step == failing:
            if machine_lost:
                monkeypatch.setattr(files, "sync_up", lambda local_dir, save_dir: None)
            raise RuntimeError("the machine went away")
        real_train_step(training, hparams, logger, train_labels, valid_labels, step, num_steps)

    monkeypatch.setattr(train_reward, "_train_step", train_step)
    with pytest.raises(RuntimeError, match="went away"):
        train_reward.train(hparams)
    monkeypatch.setattr(train_reward, "_train_step", real_train_step)
    monkeypatch.setattr(files, "sync_up", real_sync_up)


def test_a_run_killed_after_a_periodic_save_resumes_from_it_to_the_same_parameters(tmp_path, monkeypatch, capsys,
                                                                                   fake_terminal):
    """run.save_interval 3 of 6 steps (3, not 2: with 2, saving after step+1 or step-1 steps is the same): a crash
    in step 4 (counting from 0, as a preempted machine) leaves the state saved after 3 steps; the resumed run trains
    steps 3..5 and ends where an uninterrupted run ends, with each step once in TensorBoard (the crashed run's log
    of step 3 is void) and its progress bar counting on from 3. The run normalised before training; the resumed
    run keeps that scale rather than measuring it again with the half-trained model. No resume state is saved
    after the last step (the trained model is saved then)."""
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 48))
    overrides = {"labels.num_train": 48, "labels.num_valid": 0, "batch_size": 8, "run.save_interval": 3,
                 "normalize_before": True, "normalize_samples": 32, "rollout_batch_size": 32}
    straight = reward_hparams(tmp_path / "straight", labels, **overrides)
    train_reward.train(straight)
    state_files = os.listdir(os.path.join(straight.run.save_dir, "resume", "reward_model"))
    assert sorted(f for f in state_files if f.endswith(".index")) == ["state.ckpt-3.index"], state_files
    cut = reward_hparams(tmp_path / "cut", labels, **overrides)
    crash_in_step(cut, monkeypatch, 4)
    # the documented layout: SAVE_DIR/resume/reward_model/state.ckpt-STEP, the latest save only
    state_files = os.listdir(os.path.join(cut.run.save_dir, "resume", "reward_model"))
    assert sorted(f for f in state_files if f.endswith(".index")) == ["state.ckpt-3.index"], state_files
    capsys.readouterr()
    terminal = fake_terminal()  # a progress bar is drawn on a terminal only
    train_reward.train(cut, resume=True)
    printed = capsys.readouterr().out
    assert "resuming the reward model after step 3 of 6" in printed and "rewards before training" not in printed
    bars = terminal.bars("reward model")
    assert "| 3/6 [" in bars[0] and "| 6/6 [" in bars[-1], bars  # it counts on from the resumed step
    assert_same_reward_model(cut.run.save_dir, straight.run.save_dir)
    for tag, logged in stats.read_scalars(os.path.join(cut.run.save_dir, "tb", "reward_model")).items():
        assert [step for step, _ in logged] == list(range(6)), (tag, logged)


def test_a_gs_run_whose_machine_is_lost_after_a_periodic_save_resumes_on_a_fresh_machine(tmp_path, gcs_bucket,
                                                                                         monkeypatch, capsys):
    """SAVE_DIR gs:// (a real Cloud Storage emulator): each periodic save is uploaded at once, so when the machine
    goes away after 3 of 4 steps, with its local copy of the run, the bucket holds what resuming needs and a
    fresh machine (an empty cache) resumes after step 3 and finishes the run there. (A save one step before the
    end is made all the same: only the save after the last step is left to the trained model.)"""
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 32))
    hparams = reward_hparams(tmp_path, labels, save_dir=f"{gcs_bucket}/runs", **{
        "labels.num_train": 32, "labels.num_valid": 0, "batch_size": 8, "run.save_interval": 3})
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "first_machine"))
    crash_in_step(hparams, monkeypatch, 3, machine_lost=True)
    from google.cloud import storage
    bucket = gcs_bucket[len("gs://"):]

    def stored():
        return {blob.name for blob in storage.Client.create_anonymous_client().list_blobs(bucket)}

    assert {"runs/run/resume/reward_model/checkpoint", "runs/run/resume/reward_model/state.ckpt-3.index"} <= stored()
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "second_machine"))
    capsys.readouterr()
    train_reward.train(hparams, resume=True)
    assert "resuming the reward model after step 3 of 4" in capsys.readouterr().out
    assert "runs/run/reward_model/checkpoints/model.ckpt.index" in stored()


def test_the_console_counts_steps_from_1_to_the_total_and_names_where_the_model_was_saved(tmp_path, capsys):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels("best_of_4", 32))
    hparams = reward_hparams(tmp_path, labels, **{"labels.num_train": 32, "labels.num_valid": 0, "batch_size": 8,
                                                  "run.log_interval": 2})
    train_reward.train(hparams)
    printed = capsys.readouterr().out
    progress = [line.split(" | ")[0] for line in printed.splitlines() if line.startswith("reward model step")]
    assert progress == ["reward model step 2/4", "reward model step 4/4"], printed
    assert f"saved the reward model to {os.path.join(hparams.run.save_dir, 'reward_model')}\n" in printed, printed
    # resuming the finished run names where the trained model is and does nothing more
    train_reward.train(hparams, resume=True)
    assert capsys.readouterr().out == (f"the reward model in {os.path.join(hparams.run.save_dir, 'reward_model')} "
                                       "is trained; nothing to resume\n")


@pytest.mark.parametrize("label_type, tags", [
    ("best_of_4", ["loss", "error", "accuracy"]),
    ("scalar_rating", ["loss", "error", "label_mean", "label_var", "corr"]),
])
def test_reward_training_logs_the_2019_tags_from_step_0(tmp_path, label_type, tags):
    labels = write_labels(tmp_path / "labels.json", hidden_rule_labels(label_type, 64))
    hparams = reward_hparams(tmp_path, labels, label_type=label_type,
                             **{"labels.num_train": 32, "labels.num_valid": 16, "batch_size": 8})
    train_reward.train(hparams)
    assert os.listdir(os.path.join(hparams.run.save_dir, "tb")) == ["reward_model"]
    events = stats.read_scalars(os.path.join(hparams.run.save_dir, "tb", "reward_model"))
    for tag in tags:
        assert [step for step, _ in events[f"train_reward/minibatch/{tag}"]] == [0, 1, 2, 3], tag
    np.testing.assert_array_equal(events["train_reward/minibatch/error"], events["train_reward/minibatch/loss"])
    np.testing.assert_allclose([v for _, v in events["train_reward/lr"]], [2e-3 * (1 - i / 4) for i in range(4)])
    assert [step for step, _ in events["train_reward/valid/loss"]] == [3]  # the held-out set, at the end
