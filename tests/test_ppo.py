"""PPO math (docs/algorithms.md; paper section 2.2): every graph function against a plain-numpy reference
written here, the micro-batch split of the loss, the KL controllers and the hyperparameter defaults."""

import dataclasses

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import ppo
from lm_human_preferences.utils.hyperparams import HParamError

B, T = 6, 9  # episodes, response tokens


def run(fetches, feed=None):
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        return sess.run(fetches, feed)


def arrays(seed, *shapes, scale=1.0):
    rng = np.random.RandomState(seed)
    return [(scale * rng.randn(*shape)).astype(np.float32) for shape in shapes]


# ----- numpy references (written out loop by loop, independently of the graph code) ------------------------------

def np_whiten(x, shift_mean=True):
    x = x.astype(np.float64)
    whitened = (x - x.mean()) / np.sqrt(x.var() + 1e-8)
    return whitened if shift_mean else whitened + x.mean()


def np_gae(rewards, values, gamma, lam):
    batch, length = rewards.shape
    advantages = np.zeros((batch, length))
    for b in range(batch):
        for t in range(length):
            # A_t = sum_l (gamma lam)^l delta_{t+l}, with the value after the last token 0
            total = 0.0
            for later in range(t, length):
                next_value = values[b, later + 1] if later + 1 < length else 0.0
                delta = rewards[b, later] + gamma * next_value - values[b, later]
                total += (gamma * lam) ** (later - t) * delta
            advantages[b, t] = total
    return advantages


def np_value_loss(vpred, old_values, returns, c):
    clipped = np.minimum(np.maximum(vpred, old_values - c), old_values + c)
    unclipped_sq, clipped_sq = (vpred - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * np.mean(np.maximum(unclipped_sq, clipped_sq)), np.mean(clipped_sq > unclipped_sq)


def np_policy_loss(logprobs, old_logprobs, advantages, c):
    ratio = np.exp(logprobs.astype(np.float64) - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * np.clip(ratio, 1 - c, 1 + c)
    approxkl = 0.5 * np.mean((logprobs.astype(np.float64) - old_logprobs) ** 2)
    return np.mean(np.maximum(unclipped, clipped)), np.mean(clipped > unclipped), approxkl


def minibatch_loss(*, logprobs, vpred, entropies, old_logprobs, old_values, rewards, hparams):
    """The PPO loss and statistics of one minibatch taken whole: `advantages_and_returns` then `ppo_loss` (what the
    trainer computes split into micro-batches). rewards: per-token rewards; all inputs [b, T]."""
    advantages, returns = ppo.advantages_and_returns(rewards, old_values, hparams)
    loss, stats = ppo.ppo_loss(logprobs=logprobs, vpred=vpred, entropies=entropies, old_logprobs=old_logprobs,
                               old_values=old_values, advantages=advantages, returns=returns, hparams=hparams)
    stats.update(ppo.return_and_value_moments(returns, old_values))
    return loss, stats


# ----- whitening, rewards, GAE -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
    x, = arrays(0, (B, T), scale=3.0)
    x += 2.5  # a clear mean, so "mean kept" is distinguishable from "mean removed"
    out = run(ppo.whiten(tf.constant(x), shift_mean=shift_mean))
    np.testing.assert_allclose(out, np_whiten(x, shift_mean), rtol=1e-5, atol=1e-5)
    assert abs(out.var() - 1) < 1e-4
    assert abs(out.mean() - (0.0 if shift_mean else x.mean())) < 1e-4


def test_whiten_of_a_constant_is_finite():
    out = run(ppo.whiten(tf.fill([3, 4], 7.0), shift_mean=False))
    np.testing.assert_allclose(out, 7.0)  # epsilon inside the rsqrt: no NaN, mean kept


def test_kl_penalized_rewards_match_numpy():
    logprobs, ref_logprobs, scores = arrays(1, (B, T), (B, T), (B,))
    out = ppo.kl_penalized_rewards(logprobs, ref_logprobs, scores, 0.15)
    kl = logprobs - ref_logprobs
    expected = -0.15 * kl
    expected[:, -1] += scores  # the score arrives with the last token only
    np.testing.assert_allclose(out["kl"], kl, rtol=1e-6)
    np.testing.assert_allclose(out["rewards"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0), (1.0, 1.0)])
def test_gae_advantages_and_returns_match_numpy(gamma, lam):
    rewards, values = arrays(2, (B, T), (B, T))
    advantages = tf.placeholder(tf.float32, [None, T])  # the trainer feeds minibatches of any size
    values_in = tf.placeholder(tf.float32, [None, T])
    graph_advantages = ppo.gae_advantages(advantages, values_in, gamma, lam)
    out = run(graph_advantages, {advantages: rewards, values_in: values})
    np.testing.assert_allclose(out, np_gae(rewards, values, gamma, lam), rtol=1e-4, atol=1e-5)
    if gamma == lam == 1.0:
        # then A_t is simply the reward still to come minus the value: an independent closed form
        to_come = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
        np.testing.assert_allclose(out, to_come - values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("whiten_rewards", [True, False])
def test_advantages_and_returns_whiten_as_specified(whiten_rewards):
    rewards, values = arrays(3, (B, T), (B, T))
    rewards += 1.0
    hparams = ppo.PpoHParams(gamma=0.97, lam=0.9, whiten_rewards=whiten_rewards)
    advantages, returns = run(ppo.advantages_and_returns(tf.constant(rewards), tf.constant(values), hparams))
    used_rewards = np_whiten(rewards, shift_mean=False) if whiten_rewards else rewards
    raw_advantages = np_gae(used_rewards, values, 0.97, 0.9)
    np.testing.assert_allclose(returns, raw_advantages + values, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(advantages, np_whiten(raw_advantages), rtol=1e-4, atol=1e-4)


# ----- losses -------------------------------------------------------------------------------------------------------

def loss_inputs(seed=4, batch=B):
    """Inputs [batch, T] where both clips bind on some tokens and not on others."""
    old_logprobs, log_ratio, advantages, old_values, value_step, returns, entropies = arrays(
        seed, *[(batch, T)] * 7)
    logprobs = old_logprobs + 0.3 * log_ratio  # ratios from ~0.4 to ~2.5: many outside [0.8, 1.2]
    vpred = old_values + 0.4 * value_step  # moves up to ~±1: many beyond the ±0.2 value clip
    return dict(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, vpred=vpred,
                old_values=old_values, returns=returns, entropies=np.abs(entropies))


def test_clipped_value_loss_matches_numpy_with_the_clip_active():
    x = loss_inputs()
    loss, clipfrac = run(ppo.clipped_value_loss(*(tf.constant(x[k]) for k in ("vpred", "old_values", "returns")),
                                                0.2))
    expected_loss, expected_clipfrac = np_value_loss(x["vpred"], x["old_values"], x["returns"], 0.2)
    assert 0.1 < expected_clipfrac < 0.9  # the example exercises both branches
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(clipfrac, expected_clipfrac, rtol=1e-6)
    # without the clip the loss would be plain 0.5 * MSE, which is smaller here
    assert loss > 0.5 * np.mean((x["vpred"] - x["returns"]) ** 2)


def test_clipped_policy_loss_matches_numpy_with_the_clip_active():
    x = loss_inputs()
    loss, clipfrac, approxkl = run(ppo.clipped_policy_loss(
        *(tf.constant(x[k]) for k in ("logprobs", "old_logprobs", "advantages")), 0.2))
    expected = np_policy_loss(x["logprobs"], x["old_logprobs"], x["advantages"], 0.2)
    assert 0.1 < expected[1] < 0.9
    np.testing.assert_allclose([loss, clipfrac, approxkl], expected, rtol=1e-5)


def test_policy_loss_without_change_is_minus_the_mean_advantage():
    _, advantages = arrays(5, (B, T), (B, T))
    logprobs = tf.constant(np.full((B, T), -2.0, np.float32))
    loss, clipfrac, approxkl = run(ppo.clipped_policy_loss(logprobs, logprobs, tf.constant(advantages), 0.2))
    np.testing.assert_allclose(loss, -advantages.mean(), rtol=1e-5)
    assert clipfrac == 0 and approxkl == 0


def test_ppo_loss_and_statistics_match_numpy():
    x = loss_inputs()
    hparams = ppo.PpoHParams(vf_coef=0.3, cliprange=0.2, cliprange_value=0.25)
    loss, stats = run(ppo.ppo_loss(**{k: tf.constant(v) for k, v in x.items()}, hparams=hparams))
    stats.update(run(ppo.return_and_value_moments(tf.constant(x["returns"]), tf.constant(x["old_values"]))))
    vf_loss, vf_clipfrac = np_value_loss(x["vpred"], x["old_values"], x["returns"], 0.25)
    pg_loss, pg_clipfrac, approxkl = np_policy_loss(x["logprobs"], x["old_logprobs"], x["advantages"], 0.2)
    expected = {
        "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss, "ppo/loss/total": pg_loss + 0.3 * vf_loss,
        "ppo/policy/entropy": x["entropies"].mean(), "ppo/policy/approxkl": approxkl,
        "ppo/policy/clipfrac": pg_clipfrac,
        "ppo/returns/mean": x["returns"].mean(), "ppo/returns/var": x["returns"].var(),
        "ppo/val/vpred": x["vpred"].mean(), "ppo/val/error": np.mean((x["vpred"] - x["returns"]) ** 2),
        "ppo/val/clipfrac": vf_clipfrac, "ppo/val/mean": x["old_values"].mean(), "ppo/val/var": x["old_values"].var(),
    }
    assert sorted(stats) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(loss, pg_loss + 0.3 * vf_loss, rtol=1e-5)


def test_minibatch_loss_chains_advantages_and_loss_and_adds_var_explained():
    x = loss_inputs()
    rewards, = arrays(6, (B, T))
    hparams = ppo.PpoHParams(gamma=0.95, lam=0.9)
    names = ("logprobs", "vpred", "entropies", "old_logprobs", "old_values")
    loss, stats = run(minibatch_loss(**{k: tf.constant(x[k]) for k in names}, rewards=tf.constant(rewards),
                                     hparams=hparams))
    returns = np_gae(np_whiten(rewards, shift_mean=False), x["old_values"], 0.95, 0.9) + x["old_values"]
    advantages = np_whiten(returns - x["old_values"])
    pg_loss = np_policy_loss(x["logprobs"], x["old_logprobs"], advantages, 0.2)[0]
    vf_loss = np_value_loss(x["vpred"], x["old_values"], returns, 0.2)[0]
    np.testing.assert_allclose(loss, pg_loss + 0.1 * vf_loss, rtol=1e-4)
    error = np.mean((x["vpred"] - returns) ** 2)
    np.testing.assert_allclose(ppo.var_explained(stats), 1 - error / returns.var(), rtol=1e-4)
    assert ppo.var_explained({"ppo/val/error": 1.0, "ppo/returns/var": 4.0}) == 0.75


# ----- the micro-batch split ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, micro_batches", [(6, 3), (8, 4)])
def test_micro_batches_give_the_minibatch_loss_and_gradient(batch, micro_batches):
    """Advantages over the whole minibatch, then the loss over equal micro-batches, each scaled by
    1/micro_batches and summed (the mean of the micro-batch losses): the same loss and the same gradient as the
    minibatch taken whole."""
    x = loss_inputs(seed=7, batch=batch)
    rewards, = arrays(8, (batch, T))
    hparams = ppo.PpoHParams(gamma=0.9, lam=0.95)
    # trainable stand-ins for the policy's outputs, so there is a gradient to compare
    logprobs = tf.Variable(x["logprobs"])
    vpred = tf.Variable(x["vpred"])
    old = {k: tf.constant(x[k]) for k in ("entropies", "old_logprobs", "old_values")}

    full_loss, _ = minibatch_loss(logprobs=logprobs, vpred=vpred, **old, rewards=tf.constant(rewards),
                                  hparams=hparams)
    advantages, returns = ppo.advantages_and_returns(tf.constant(rewards), old["old_values"], hparams)
    size = batch // micro_batches
    parts = [slice(start, start + size) for start in range(0, batch, size)]
    assert len(parts) == micro_batches
    micro_losses = []
    for part in parts:
        loss, _ = ppo.ppo_loss(logprobs=logprobs[part], vpred=vpred[part], entropies=old["entropies"][part],
                               old_logprobs=old["old_logprobs"][part], old_values=old["old_values"][part],
                               advantages=advantages[part], returns=returns[part], hparams=hparams)
        micro_losses.append(loss / micro_batches)
    accumulated = tf.add_n(micro_losses)
    accumulated_grads = [tf.add_n(g) for g in zip(*(tf.gradients(l, [logprobs, vpred]) for l in micro_losses))]
    full_grads = tf.gradients(full_loss, [logprobs, vpred])

    # the wrong split, advantages whitened per micro-batch, must differ (so the comparison can fail)
    wrong = [minibatch_loss(logprobs=logprobs[part], vpred=vpred[part], **{k: v[part] for k, v in old.items()},
                            rewards=tf.constant(rewards[part]), hparams=hparams)[0] / micro_batches
             for part in parts]
    out = run(dict(full=full_loss, accumulated=accumulated, full_grads=full_grads,
                   accumulated_grads=accumulated_grads, wrong=tf.add_n(wrong)))
    np.testing.assert_allclose(out["accumulated"], out["full"], rtol=1e-5)
    for accumulated_grad, full_grad in zip(out["accumulated_grads"], out["full_grads"]):
        assert np.abs(full_grad).max() > 0
        np.testing.assert_allclose(accumulated_grad, full_grad, rtol=1e-4, atol=1e-7)
    assert abs(out["wrong"] - out["full"]) > 1e-3

    # and the same number from numpy: mean over the parts of each part's loss with the minibatch's advantages
    np_returns = np_gae(np_whiten(rewards, shift_mean=False), x["old_values"], 0.9, 0.95) + x["old_values"]
    np_advantages = np_whiten(np_returns - x["old_values"])
    np_part_losses = [np_policy_loss(x["logprobs"][part], x["old_logprobs"][part], np_advantages[part], 0.2)[0]
                      + 0.1 * np_value_loss(x["vpred"][part], x["old_values"][part], np_returns[part], 0.2)[0]
                      for part in parts]
    np.testing.assert_allclose(out["accumulated"], np.mean(np_part_losses), rtol=1e-4)


# ----- KL controllers and hyperparameters -------------------------------------------------------------------------

def test_fixed_kl_controller_stays_fixed():
    controller = ppo.FixedKLController(0.2)
    for kl in (0.0, 3.0, 100.0):
        controller.update(kl, 512)
    assert controller.value == 0.2


def test_adaptive_kl_controller_moves_toward_the_target_from_both_sides():
    above, below = ppo.AdaptiveKLController(0.15, 6.0, 10000), ppo.AdaptiveKLController(0.15, 6.0, 10000)
    above.update(6.6, 512)  # KL 10% too high: error 0.1, factor 1 + 0.1 * 512 / 10000 = 1.00512
    below.update(5.7, 512)  # 5% too low: error -0.05, factor 1 - 0.05 * 0.0512 = 0.99744
    assert above.value == pytest.approx(0.150768, abs=1e-12)
    assert below.value == pytest.approx(0.149616, abs=1e-12)
    above.update(6.6, 512)  # the factors compound: 0.150768 * 1.00512
    assert above.value == pytest.approx(0.1515399322, abs=1e-10)
    on_target = ppo.AdaptiveKLController(0.15, 6.0, 10000)
    on_target.update(6.0, 512)
    assert on_target.value == 0.15


def test_adaptive_kl_controller_clips_the_error_at_0_2():
    far_above, far_below = ppo.AdaptiveKLController(0.1, 2.0, 1000), ppo.AdaptiveKLController(0.1, 2.0, 1000)
    far_above.update(20.0, 100)  # error 9 -> 0.2: factor 1 + 0.2 * 100 / 1000 = 1.02
    far_below.update(0.0, 100)  # error -1 -> -0.2: factor 0.98
    assert far_above.value == pytest.approx(0.102, abs=1e-12)
    assert far_below.value == pytest.approx(0.098, abs=1e-12)
    just_inside = ppo.AdaptiveKLController(0.1, 2.0, 1000)
    just_inside.update(2.3, 100)  # error 0.15, inside the clip: factor 1.015
    assert just_inside.value == pytest.approx(0.1015, abs=1e-12)


def test_adaptive_kl_controller_converges_on_a_kl_that_falls_with_the_coefficient():
    """A toy world where KL = 1 / kl_coef: the controller settles where KL = target."""
    controller = ppo.AdaptiveKLController(0.5, target=4.0, horizon=1000)
    for _ in range(2000):
        controller.update(1.0 / controller.value, 64)
    assert controller.value == pytest.approx(0.25, rel=1e-3)


def test_ppo_hparams_have_the_2019_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(ppo.PpoHParams)}
    assert defaults == dict(total_episodes=2_000_000, batch_size=64, nminibatches=1, noptepochs=4, lr=5e-6,
                            vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
                            whiten_rewards=True, micro_batches=1)
    assert ppo.AdaptiveKLParams().horizon == 10000 and ppo.AdaptiveKLParams().target is None


@pytest.mark.parametrize("field, value, message", [
    ("lam", 1.5, r"ppo.lam must be in \[0, 1\], got 1.5"),
    ("micro_batches", 0, "ppo.micro_batches must be positive, got 0"),
    ("cliprange", 0.0, "ppo.cliprange must be positive"),
])
def test_ppo_hparams_reject_bad_values_by_name(field, value, message):
    with pytest.raises(HParamError, match=message):
        ppo.PpoHParams(**{field: value}).validate("ppo.")


def test_adaptive_kl_params_require_a_target():
    with pytest.raises(HParamError, match="rewards.adaptive_kl.target"):
        ppo.AdaptiveKLParams().validate("rewards.adaptive_kl.")
    ppo.AdaptiveKLParams(target=6.0).validate("rewards.adaptive_kl.")


@pytest.mark.parametrize("target, horizon, message", [
    (0.0, 10000, r"rewards.adaptive_kl.target must be positive \(nats\), got 0.0"),
    (-1.0, 10000, r"rewards.adaptive_kl.target must be positive \(nats\), got -1.0"),
    (6.0, 0, r"rewards.adaptive_kl.horizon must be positive \(episodes\), got 0"),
    (6.0, -5, r"rewards.adaptive_kl.horizon must be positive \(episodes\), got -5"),
])
def test_adaptive_kl_params_refuse_non_positive_settings_by_name(target, horizon, message):
    with pytest.raises(HParamError, match=message):
        ppo.AdaptiveKLParams(target=target, horizon=horizon).validate("rewards.adaptive_kl.")


def test_adaptive_kl_params_accept_the_smallest_positive_settings():
    ppo.AdaptiveKLParams(target=0.5, horizon=1).validate("rewards.adaptive_kl.")
    # the bounds are > 0, not >= 1, and the controller takes what the hyperparameters accept
    controller = ppo.AdaptiveKLController(0.1, 0.5, 1)
    assert (controller.value, controller.target) == (0.1, 0.5)


def test_gae_of_one_token_responses_is_the_reward_minus_the_value():
    """response_length 1 is accepted: the advantage is then r - V (nothing follows)."""
    rewards, values = arrays(4, (B, 1), (B, 1))
    out = run(ppo.gae_advantages(tf.constant(rewards), tf.constant(values), 0.9, 0.8))
    np.testing.assert_allclose(out, rewards - values, rtol=1e-5, atol=1e-6)
