"""RewardModel on its own (lm_human_preferences/rewards.py): which position is read, the affine normalisation,
its reset and its refusal, and which variables it owns. Expected values are computed here with numpy."""

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.rewards import RewardModel

PADDING = 27  # the `test` encoding's padding token


def tokens(seed, batch=16, query=3, response=4):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 27, (batch, query)).astype(np.int32), rng.randint(0, 27, (batch, response)).astype(np.int32)


@pytest.fixture
def built():
    """A reward model with a random head (the initial head is zero), its ops and a session."""
    reward_model = RewardModel(TrainedModel("test"))
    queries = tf.placeholder(tf.int32, [None, None])
    responses = tf.placeholder(tf.int32, [None, None])
    ops = dict(rewards=reward_model.get_rewards_op(queries, responses),
               raw=reward_model.get_raw_rewards_op(queries, responses),
               every_position=reward_model.model(tf.concat([queries, responses], axis=1),
                                                  padding_token=PADDING)["reward"])
    sess = tf.Session()
    sess.run(tf.global_variables_initializer())
    rng = np.random.RandomState(0)
    for var in reward_model.get_params():
        if "/heads/reward/" in var.op.name:
            var.load(rng.normal(size=var.shape.as_list()).astype(np.float32), sess)

    def run(name, q, r):
        return sess.run(ops[name], {queries: q, responses: r})

    yield reward_model, sess, run
    sess.close()


def set_norm(reward_model, sess, gain, bias):
    reward_model.gain.load(gain, sess)
    reward_model.bias.load(bias, sess)


def test_a_new_reward_model_starts_with_gain_one_and_bias_zero(built):
    reward_model, sess, run = built
    assert sess.run([reward_model.gain, reward_model.bias]) == [1.0, 0.0]
    q, r = tokens(1)
    np.testing.assert_array_equal(run("rewards", q, r), run("raw", q, r))


def test_the_reward_is_the_heads_output_at_the_last_position_times_gain_plus_bias(built):
    reward_model, sess, run = built
    q, r = tokens(2)
    set_norm(reward_model, sess, 2.5, -0.75)
    every = run("every_position", q, r)  # [b, q + r]
    assert every.shape == (16, 7)
    # the positions differ, so reading any other one would be noticed
    assert np.min(np.abs(every[:, -1:] - every[:, :-1])) > 1e-4
    np.testing.assert_allclose(run("raw", q, r), every[:, -1], rtol=1e-6)
    np.testing.assert_allclose(run("rewards", q, r), 2.5 * every[:, -1] - 0.75, rtol=1e-5, atol=1e-6)


def test_a_padded_response_scores_as_its_unpadded_prefix(built):
    _, _, run = built
    q, r = tokens(3, batch=4)
    padded = r.copy()
    padded[:, 2:] = PADDING
    np.testing.assert_allclose(run("raw", q, padded), run("raw", q, r[:, :2]), rtol=1e-5, atol=1e-6)
    assert np.min(np.abs(run("raw", q, padded) - run("raw", q, r))) > 1e-4


def test_reset_gives_gain_one_and_bias_zero_again(built):
    reward_model, sess, run = built
    set_norm(reward_model, sess, 3.0, -2.0)
    reward_model.reset_reward_scale(sess)
    assert sess.run([reward_model.gain, reward_model.bias]) == [1.0, 0.0]
    q, r = tokens(4)
    np.testing.assert_array_equal(run("rewards", q, r), run("raw", q, r))


@pytest.mark.parametrize("gain, bias", [(3.0, -2.0), (-3.0, 2.0), (1.0, 0.0)])
@pytest.mark.parametrize("target_mean, target_std", [(0.0, 1.0), (1.5, 0.25)])
def test_normalisation_gives_the_target_mean_and_std_on_the_measured_samples(built, gain, bias, target_mean,
                                                                            target_std):
    reward_model, sess, run = built
    set_norm(reward_model, sess, gain, bias)
    q, r = tokens(5, batch=64)
    before = run("rewards", q, r)
    reward_model.set_reward_norm(sess, measured_mean=float(np.mean(before)), measured_std=float(np.std(before)),
                                 target_mean=target_mean, target_std=target_std)
    after = run("rewards", q, r)
    assert abs(np.mean(after) - target_mean) < 1e-4 and abs(np.std(after) - target_std) < 1e-4
    # an affine map of the same raw rewards that keeps their order
    np.testing.assert_allclose(after, (before - np.mean(before)) / np.std(before) * target_std + target_mean,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("measured_std", [0.0, -1.0, float("nan")])
def test_a_zero_negative_or_nan_std_is_refused_and_nothing_changes(built, measured_std):
    reward_model, sess, _ = built
    set_norm(reward_model, sess, 3.0, -2.0)
    with pytest.raises(ValueError, match=r"cannot normalise rewards: their measured std is "
                                         rf"{measured_std} \(the reward model gives the same score"):
        reward_model.set_reward_norm(sess, measured_mean=0.5, measured_std=measured_std, target_mean=0.0,
                                     target_std=1.0)
    assert sess.run([reward_model.gain, reward_model.bias]) == [3.0, -2.0]


def test_its_parameters_are_its_trunk_head_gain_and_bias_and_no_other_scopes(built):
    reward_model, _, _ = built
    RewardModel(TrainedModel("test"), scope="reward_model_copy")  # a scope whose name starts with ours
    names = {var.op.name for var in reward_model.get_params()}
    assert {"reward_model/model/heads/reward/w", "reward_model/model/heads/reward/b",
            "reward_model/reward_norm/gain", "reward_model/reward_norm/bias", "reward_model/model/wte"} <= names
    assert all(name.startswith("reward_model/") for name in names)
    trunk = {var.op.name for var in tf.trainable_variables("reward_model/model/")}
    assert names == trunk | {"reward_model/reward_norm/gain", "reward_model/reward_norm/bias"}


def test_mixed_precision_computes_the_trunk_in_bfloat16_and_gives_float32_rewards():
    reward_model = RewardModel(TrainedModel("test"), compute_dtype=tf.bfloat16)
    q, r = tokens(6, batch=4)
    rewards = reward_model.get_rewards_op(tf.constant(q), tf.constant(r))
    assert rewards.dtype == tf.float32
    bf16_matmuls = [op for op in tf.get_default_graph().get_operations()
                    if op.type in ("MatMul", "BatchMatMulV2") and op.get_attr("T") == tf.bfloat16]
    assert len(bf16_matmuls) >= 4 * TrainedModel("test").hparams().n_layer  # qkv, projection, mlp in and out
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        assert np.all(np.isfinite(sess.run(rewards)))
