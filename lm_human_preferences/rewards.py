"""The reward model: a GPT-2 trunk, a scalar `reward` head read at the last
position of query + response, and an affine normalisation `reward_norm/{gain,bias}`.

Variables: `SCOPE/model/...` (GPT-2 names), `SCOPE/model/heads/reward/{w,b}`, `SCOPE/reward_norm/{gain,bias}`.
The normalisation is set before training so that rewards on policy samples match the labels' scale, and
after training to mean 0 / std 1, so that the PPO KL coefficient keeps its meaning. As in 2019, gain and
bias are also among the trained parameters, and the reward model reads the bare query tokens followed by
the response: the task's query prefix/suffix are the policy's context only (the released reward models
were trained that way).
"""

import tensorflow.compat.v1 as tf

from lm_human_preferences.language import model as lm_model


class RewardModel:
    """Owns the reward model's variables; builds reward ops and the normalisation assignments."""

    def __init__(self, trained_model, *, scope="reward_model", compute_dtype=tf.float32):
        """compute_dtype: tf.bfloat16 for mixed precision (float32 variables and rewards; see language/model.py)."""
        self.trained_model = trained_model
        self.model_hparams = trained_model.hparams()
        self.padding_token = trained_model.encoding.padding_token
        self.scope = scope
        with tf.variable_scope(scope):
            self.model = lm_model.Model(self.model_hparams, scalar_heads=["reward"], scope="model",
                                        compute_dtype=compute_dtype)
            with tf.variable_scope("reward_norm"):
                self.gain = tf.get_variable("gain", shape=(), initializer=tf.ones_initializer())
                self.bias = tf.get_variable("bias", shape=(), initializer=tf.zeros_initializer())
        # Build once so that every variable exists, then route the initial weights from the trained model.
        with tf.name_scope(f"{scope}_build"):
            self.model(tf.zeros([1, 1], tf.int32), padding_token=self.padding_token)
        trained_model.init_op(self.get_params(), new_scope=scope)
        # Placeholders for setting the normalisation: reward' = gain * r + bias.
        self._new_gain = tf.placeholder(tf.float32, [], name="new_gain")
        self._new_bias = tf.placeholder(tf.float32, [], name="new_bias")
        self._assign_norm = tf.group(self.gain.assign(self._new_gain), self.bias.assign(self._new_bias))

    def get_params(self):
        """The transformer, its reward head and reward_norm gain/bias (all trained, as in 2019)."""
        return tf.trainable_variables(self.scope + "/")

    def get_raw_rewards_op(self, queries, responses):
        """Head output at the last position, before the normalisation.  queries [b, q], responses [b, r] -> [b]"""
        tokens = tf.concat([queries, responses], axis=1)  # [b, query_length + r]
        outputs = self.model(tokens, padding_token=self.padding_token)
        # Padded positions carry the output of the last real token, so the last position is the
        # score of the whole (possibly truncated) response.
        return outputs["reward"][:, -1]  # [b]

    def get_rewards_op(self, queries, responses):
        return self.gain * self.get_raw_rewards_op(queries, responses) + self.bias  # [b]

    # ----- normalisation -----------------------------------------------------------------------------------
    def reset_reward_scale(self, sess):
        """gain 1, bias 0: the rewards are the head's raw output again (2019 reset before measuring)."""
        sess.run(self._assign_norm, {self._new_gain: 1.0, self._new_bias: 0.0})

    def set_reward_norm(self, sess, *, measured_mean, measured_std, target_mean, target_std):
        """Make rewards whose current mean/std are `measured_*` have mean/std `target_*`.

        With r' = gain * r + bias measured at (m, s): gain <- gain * t_s / s, bias <- (bias - m) * t_s / s + t_m.
        """
        if not measured_std > 0:
            raise ValueError(f"cannot normalise rewards: their measured std is {measured_std} "
                             "(the reward model gives the same score to every sample)")
        gain, bias = sess.run([self.gain, self.bias])
        scale = target_std / measured_std
        sess.run(self._assign_norm, {self._new_gain: gain * scale,
                                     self._new_bias: (bias - measured_mean) * scale + target_mean})
