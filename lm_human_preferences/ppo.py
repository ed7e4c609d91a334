"""PPO for language models: hyperparameters, the KL controllers, the KL-penalised rewards (numpy), and the pure
graph functions of one update — whitening, GAE, the clipped losses and their statistics.

An episode is one query and its `T = response_length` response tokens; every tensor here is [batch, T] unless
said otherwise, and each response token is one PPO time step.

The trainer (`train_policy.py`) splits a minibatch step in two:

1. `advantages_and_returns` over the whole minibatch (reward whitening and advantage whitening are minibatch
   statistics, so they must not be computed per micro-batch), with `return_and_value_moments` of it, then
2. `ppo_loss` over each micro-batch of it. Every term of the loss is a mean over tokens, so with equal-sized
   micro-batches the sum over micro-batches of grad(loss) / micro_batches equals the gradient of the minibatch
   loss: gradient accumulation changes the memory needed, not the update.

The update step by step, every hyperparameter with its 2019 default, and the KL controllers: docs/algorithms.md.
"""

import numpy as np
import tensorflow.compat.v1 as tf

# The groups `ppo` and `rewards.adaptive_kl` are declared in hparams.py, which needs no TensorFlow.
from lm_human_preferences.hparams import AdaptiveKLParams, PpoHParams  # noqa: F401

WHITEN_EPSILON = 1e-8  # inside the rsqrt, so constant inputs whiten to 0 instead of NaN


# ----- KL controllers (host side, updated once per PPO update) ----------------------------------------------------

class FixedKLController:
    """A constant kl_coef."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int):
        """Nothing to adapt."""


class AdaptiveKLController:
    """A proportional controller that steers the KL toward `target` (Ziegler et al. 2019, section 2.2):
    error = clip(KL / target − 1, −0.2, 0.2); kl_coef ← kl_coef · (1 + error · n_steps / horizon).

    The clip bounds how fast kl_coef moves when the KL is far off, e.g. right at the start. target and horizon
    are positive (checked with the hyperparameters, hparams.AdaptiveKLParams)."""

    ERROR_CLIP = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int):
        """`current_kl`: mean KL per episode of the last update; `n_steps`: episodes in that update."""
        proportional_error = float(np.clip(current_kl / self.target - 1, -self.ERROR_CLIP, self.ERROR_CLIP))
        self.value *= 1 + proportional_error * n_steps / self.horizon


# ----- rewards (host side, once per PPO update) ------------------------------------------------------------------

def kl_penalized_rewards(logprobs, ref_logprobs, scores, kl_coef):
    """Per-token rewards −kl_coef·(logp − ref_logp), with the episode's score added at its last token.

    logprobs, ref_logprobs: [b, T] numpy arrays of the sampled tokens; scores: [b]; kl_coef: a float.
    Returns a dict of [b, T] arrays: `rewards` and `kl` (logp − ref_logp, whose sum over T estimates the
    episode's KL)."""
    kl = logprobs - ref_logprobs  # [b, T]
    rewards = -kl_coef * kl  # [b, T]: the KL penalty
    rewards[:, -1] += np.asarray(scores, rewards.dtype)  # the score arrives with the last token only
    return {"rewards": rewards, "kl": kl}


# ----- graph functions --------------------------------------------------------------------------------------------

def whiten(values, shift_mean=True):
    """(values − mean) / std over all elements. With shift_mean=False the mean is added back: the values are
    rescaled to unit variance but keep their mean (reward whitening, as in 2019)."""
    mean, variance = tf.nn.moments(values, axes=list(range(values.shape.ndims)))
    whitened = (values - mean) * tf.rsqrt(variance + WHITEN_EPSILON)
    return whitened if shift_mean else whitened + mean


def gae_advantages(rewards, values, gamma, lam):
    """Generalised advantage estimation. rewards, values: [b, T] -> advantages [b, T].

    delta_t = r_t + γ·V_{t+1} − V_t with V_T = 0 (the episode ends after its last token), and
    A_t = delta_t + γλ·A_{t+1}: a discounted cumulative sum of the deltas, run backwards over T."""
    next_values = tf.concat([values[:, 1:], tf.zeros_like(values[:, :1])], axis=1)  # [b, T]
    deltas = rewards + gamma * next_values - values  # [b, T]
    advantages_time_major = tf.scan(lambda later_advantage, delta: delta + gamma * lam * later_advantage,
                                    tf.transpose(deltas), initializer=tf.zeros_like(deltas[:, 0]),
                                    reverse=True)  # [T, b]
    return tf.transpose(advantages_time_major)  # [b, T]


def advantages_and_returns(rewards, values, hparams: PpoHParams):
    """Over one whole minibatch: optionally whiten the rewards (scale only), GAE, returns = advantages + values,
    then whiten the advantages. rewards, values: [b, T] -> (advantages, returns), each [b, T], no gradient."""
    if hparams.whiten_rewards:
        rewards = whiten(rewards, shift_mean=False)
    advantages = gae_advantages(rewards, values, hparams.gamma, hparams.lam)  # [b, T]
    returns = advantages + values  # [b, T]: the value head's regression target
    return tf.stop_gradient(whiten(advantages)), tf.stop_gradient(returns)


def _fraction(condition):
    return tf.reduce_mean(tf.cast(condition, tf.float32))


def clipped_value_loss(vpred, old_values, returns, cliprange_value):
    """0.5·mean(max((v − R)², (clip(v, v_old ± c) − R)²)) and the fraction of tokens where the clipped term is
    the larger one (where the clip binds). All inputs [b, T]; outputs are scalars."""
    vpred_clipped = tf.clip_by_value(vpred, old_values - cliprange_value, old_values + cliprange_value)
    losses = tf.square(vpred - returns)  # [b, T]
    losses_clipped = tf.square(vpred_clipped - returns)  # [b, T]
    loss = 0.5 * tf.reduce_mean(tf.maximum(losses, losses_clipped))
    return loss, _fraction(losses_clipped > losses)


def clipped_policy_loss(logprobs, old_logprobs, advantages, cliprange):
    """mean(max(−A·ratio, −A·clip(ratio, 1 ± c))) with ratio = exp(logp − old_logp), the fraction of tokens
    where the clip binds, and approxkl = 0.5·mean((logp − old_logp)²). All inputs [b, T]; outputs scalars."""
    log_ratio = logprobs - old_logprobs  # [b, T]
    ratio = tf.exp(log_ratio)
    losses = -advantages * ratio  # [b, T]
    losses_clipped = -advantages * tf.clip_by_value(ratio, 1.0 - cliprange, 1.0 + cliprange)  # [b, T]
    loss = tf.reduce_mean(tf.maximum(losses, losses_clipped))
    approxkl = 0.5 * tf.reduce_mean(tf.square(log_ratio))
    return loss, _fraction(losses_clipped > losses), approxkl


def ppo_loss(*, logprobs, vpred, entropies, old_logprobs, old_values, advantages, returns, hparams: PpoHParams):
    """The PPO loss pg + vf_coef·vf of a (micro-)batch and its statistics, named as the 2019 code logged them.

    logprobs, vpred, entropies: the current policy's, [b, T]; old_logprobs, old_values: the rollout's, [b, T];
    advantages, returns: from `advantages_and_returns` over the enclosing minibatch, [b, T].
    `ppo/val/var_explained` is left to `var_explained`, computed once the statistics are averaged."""
    vf_loss, vf_clipfrac = clipped_value_loss(vpred, old_values, returns, hparams.cliprange_value)
    pg_loss, pg_clipfrac, approxkl = clipped_policy_loss(logprobs, old_logprobs, advantages, hparams.cliprange)
    loss = pg_loss + hparams.vf_coef * vf_loss
    stats = {
        "ppo/loss/policy": pg_loss,
        "ppo/loss/value": vf_loss,
        "ppo/loss/total": loss,
        "ppo/policy/entropy": tf.reduce_mean(entropies),
        "ppo/policy/approxkl": approxkl,
        "ppo/policy/clipfrac": pg_clipfrac,
        "ppo/val/vpred": tf.reduce_mean(vpred),
        "ppo/val/error": tf.reduce_mean(tf.square(vpred - returns)),
        "ppo/val/clipfrac": vf_clipfrac,
    }
    return loss, stats


def return_and_value_moments(returns, old_values):
    """`ppo/returns/{mean,var}` and `ppo/val/{mean,var}` of a whole minibatch (returns, old_values: [b, T]).

    Kept apart from `ppo_loss` because a variance is not the mean of the micro-batches' variances: taken over
    the whole minibatch, the logged numbers do not depend on `ppo.micro_batches`."""
    return_mean, return_var = tf.nn.moments(returns, axes=[0, 1])
    value_mean, value_var = tf.nn.moments(old_values, axes=[0, 1])
    return {"ppo/returns/mean": return_mean, "ppo/returns/var": return_var,
            "ppo/val/mean": value_mean, "ppo/val/var": value_var}


def var_explained(stats):
    """1 − error / var(returns): the share of the returns' variance the value head explains, from statistics
    already averaged over minibatches and ranks (floats, as in 2019)."""
    return 1.0 - stats["ppo/val/error"] / max(stats["ppo/returns/var"], WHITEN_EPSILON)
