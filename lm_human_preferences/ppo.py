"""PPO for language models (SPEC section 8): hyperparameters, the KL controllers, and the pure graph functions
of one update — KL-penalised rewards, whitening, GAE, the clipped losses and their statistics.

The trainer (`train_policy.py`) computes advantages and returns over a whole minibatch first
(`advantages_and_returns`), then the loss over micro-batches of it (`ppo_loss`): every term of the loss is a
mean over tokens, so with equal micro-batches the summed gradients of loss/micro_batches equal the gradient
of the minibatch loss, and gradient accumulation changes memory, not the update.
"""

from dataclasses import dataclass

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences.utils import hyperparams
from lm_human_preferences.utils.hyperparams import require


@dataclass
class PpoHParams(hyperparams.HParams):
    total_episodes: int = 2_000_000  # episodes (query + response) over the whole run, all ranks
    batch_size: int = 64  # episodes per PPO update, all ranks together
    nminibatches: int = 1  # minibatches (Adam steps) per epoch over the batch
    noptepochs: int = 4  # passes over each batch
    lr: float = 5e-6  # Adam learning rate at the start; annealed linearly to 0 over all updates
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    cliprange: float = 0.2  # policy ratio clip: ratio in [1 - c, 1 + c]
    cliprange_value: float = 0.2  # value clip: new values within old values ± c
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = True  # rescale per-token rewards to unit variance per minibatch (mean kept)
    micro_batches: int = 1  # split each minibatch into this many micro-batches whose gradients are summed
    #                         before one Adam step: the same update with less memory (new; 2019 had none)

    def check(self, prefix):
        for name in ("total_episodes", "batch_size", "nminibatches", "noptepochs", "micro_batches"):
            require(getattr(self, name) > 0, f"{prefix}{name} must be positive, got {getattr(self, name)}")
        require(self.lr >= 0, f"{prefix}lr must be >= 0, got {self.lr}")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1,
                f"{prefix}gamma and {prefix}lam must be in [0, 1], got {self.gamma} and {self.lam}")
        require(self.cliprange > 0 and self.cliprange_value > 0,
                f"{prefix}cliprange and {prefix}cliprange_value must be positive")


@dataclass
class AdaptiveKLParams(hyperparams.HParams):
    target: float = None  # the KL (nats per response) that kl_coef is steered toward
    horizon: int = 10000  # episodes over which a proportional error of 1 would change kl_coef by e-fold

    def check(self, prefix):
        require(self.target > 0, f"{prefix}target must be positive, got {self.target}")
        require(self.horizon > 0, f"{prefix}horizon must be positive, got {self.horizon}")


# ----- KL controllers --------------------------------------------------------------------------------------------

class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int):
        pass


class AdaptiveKLController:
    """kl_coef ← kl_coef · (1 + clip(KL/target − 1, ±0.2) · n_steps / horizon): a clipped proportional rule."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int):
        proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon


# ----- graph functions ------------------------------------------------------------------------------------------

def whiten(values, shift_mean=True):
    """Normalise to unit variance over all elements; with shift_mean=False the mean is kept (rewards)."""
    mean, variance = tf.nn.moments(values, axes=list(range(values.shape.ndims)))
    whitened = (values - mean) * tf.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalized_rewards(logprobs, ref_logprobs, scores, kl_coef):
    """Per-token rewards: −kl_coef·(logp − ref_logp), plus the episode's score at its last token.
    logprobs, ref_logprobs [b, T]; scores [b] -> dict rewards, kl, non_score_rewards, each [b, T]."""
    kl = logprobs - ref_logprobs  # [b, T]
    non_score_rewards = -kl_coef * kl
    length = tf.shape(kl)[1]
    at_last_token = tf.one_hot(length - 1, length, dtype=scores.dtype)[None, :]  # [1, T]
    rewards = non_score_rewards + scores[:, None] * at_last_token
    return {"rewards": rewards, "kl": kl, "non_score_rewards": non_score_rewards}


def gae_advantages(rewards, values, gamma, lam):
    """Generalised advantage estimation, backwards over the T tokens (static T), with value 0 after the end.
    rewards, values [b, T] -> advantages [b, T]."""
    length = rewards.shape.as_list()[1]
    last_advantage = tf.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t < length - 1 else tf.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages_reversed.append(last_advantage)
    return tf.stack(advantages_reversed[::-1], axis=1)


def advantages_and_returns(rewards, values, hparams: PpoHParams):
    """Over one minibatch: optionally whiten rewards (scale only), GAE, returns = advantages + values, then
    whiten the advantages. rewards, values [b, T] -> (advantages, returns), each [b, T]."""
    if hparams.whiten_rewards:
        rewards = whiten(rewards, shift_mean=False)
    advantages = gae_advantages(rewards, values, hparams.gamma, hparams.lam)
    returns = advantages + values
    return tf.stop_gradient(whiten(advantages)), tf.stop_gradient(returns)


def clipped_value_loss(vpred, old_values, returns, cliprange_value):
    """0.5·mean(max((v − R)², (clip(v, v_old ± c) − R)²)) and the fraction of tokens where the clip binds."""
    vpred_clipped = tf.clip_by_value(vpred, old_values - cliprange_value, old_values + cliprange_value)
    losses, losses_clipped = tf.square(vpred - returns), tf.square(vpred_clipped - returns)
    loss = 0.5 * tf.reduce_mean(tf.maximum(losses, losses_clipped))
    clipfrac = tf.reduce_mean(tf.cast(tf.greater(losses_clipped, losses), tf.float32))
    return loss, clipfrac


def clipped_policy_loss(logprobs, old_logprobs, advantages, cliprange):
    """mean(max(−A·ratio, −A·clip(ratio, 1 ± c))), the clip fraction, and approxkl = 0.5·mean((Δ logp)²)."""
    ratio = tf.exp(logprobs - old_logprobs)
    losses = -advantages * ratio
    losses_clipped = -advantages * tf.clip_by_value(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = tf.reduce_mean(tf.maximum(losses, losses_clipped))
    clipfrac = tf.reduce_mean(tf.cast(tf.greater(losses_clipped, losses), tf.float32))
    approxkl = 0.5 * tf.reduce_mean(tf.square(logprobs - old_logprobs))
    return loss, clipfrac, approxkl


def ppo_loss(*, logprobs, vpred, entropies, old_logprobs, old_values, advantages, returns, hparams: PpoHParams):
    """The PPO loss of a (micro-)batch and its statistics (SPEC section 8 names). All inputs [b, T]."""
    vf_loss, vf_clipfrac = clipped_value_loss(vpred, old_values, returns, hparams.cliprange_value)
    pg_loss, pg_clipfrac, approxkl = clipped_policy_loss(logprobs, old_logprobs, advantages, hparams.cliprange)
    loss = pg_loss + hparams.vf_coef * vf_loss
    return_mean, return_var = tf.nn.moments(returns, axes=[0, 1])
    value_mean, value_var = tf.nn.moments(old_values, axes=[0, 1])
    stats = {
        "ppo/loss/policy": pg_loss,
        "ppo/loss/value": vf_loss,
        "ppo/loss/total": loss,
        "ppo/policy/entropy": tf.reduce_mean(entropies),
        "ppo/policy/approxkl": approxkl,
        "ppo/policy/clipfrac": pg_clipfrac,
        "ppo/returns/mean": return_mean,
        "ppo/returns/var": return_var,
        "ppo/val/vpred": tf.reduce_mean(vpred),
        "ppo/val/error": tf.reduce_mean(tf.square(vpred - returns)),
        "ppo/val/clipfrac": vf_clipfrac,
        "ppo/val/mean": value_mean,
        "ppo/val/var": value_var,
    }
    return loss, stats


def var_explained(stats):
    """1 − error / var(returns), from statistics already averaged over minibatches and ranks (as in 2019)."""
    return 1.0 - stats["ppo/val/error"] / max(stats["ppo/returns/var"], 1e-8)
