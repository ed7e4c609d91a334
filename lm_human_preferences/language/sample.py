"""Sampling from the language model inside the graph: one `tf.while_loop`, one cached model step per token.

The log-probabilities returned are those of the sampled tokens under the temperature-scaled distribution
(logits / temperature, before any top-k / top-p filtering), so they equal what `logprobs_of` gives when the
same tokens are scored again by a full forward pass (`Policy.analyze_responses`): PPO's ratio starts at 1.
"""

from typing import Dict, Optional

import tensorflow.compat.v1 as tf

from lm_human_preferences.language.model import Model, past_shape, shape_list

# Logit given to tokens that top-k / top-p rule out: finite, so no NaN ever appears, and exp() of it is 0.
EXCLUDED_LOGIT = -1e10


def log_softmax_and_entropy(logits):
    """logits [..., V] -> (log-probabilities [..., V], entropy [...]) in nats."""
    logp = tf.nn.log_softmax(logits)
    return logp, -tf.reduce_sum(tf.exp(logp) * logp, axis=-1)


def logprobs_of(logp, tokens):
    """Pick the log-probability of each token: logp [..., V], tokens [...] -> [...].

    A token outside the vocabulary (the padding token) gets log-probability 0: it is no token at all."""
    n_vocab = shape_list(logp)[-1]
    in_vocab = tf.logical_and(tokens >= 0, tokens < n_vocab)
    picked = tf.gather(logp, tf.where_v2(in_vocab, tokens, 0), batch_dims=len(tokens.shape))
    return tf.where_v2(in_vocab, picked, 0.0)


def take_top_k(logits, k: int):
    """Keep the k largest logits of each row [b, V] (ties with the k-th kept too)."""
    kth = tf.math.top_k(logits, k=k).values[:, -1:]  # [b, 1]
    return tf.where_v2(logits < kth, EXCLUDED_LOGIT, logits)


def take_top_p(logits, p: float):
    """Nucleus filtering: keep the most likely tokens whose total probability first reaches p (at least one)."""
    ordered = tf.sort(logits, axis=-1, direction="DESCENDING")  # [b, V]
    mass_before = tf.cumsum(tf.nn.softmax(ordered), axis=-1, exclusive=True)
    threshold = tf.reduce_min(tf.where_v2(mass_before < p, ordered, ordered[:, :1]), axis=-1, keepdims=True)
    return tf.where_v2(logits < threshold, EXCLUDED_LOGIT, logits)


def _check_options(length, top_k, top_p):
    if isinstance(length, int) and length < 1:
        raise ValueError(f"sample_sequence: length must be at least 1 token, got {length}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"sample_sequence: top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sample_sequence: top_p must be in (0, 1] (1: off), got {top_p!r}")


def sample_sequence(model: Model, *, length, context, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
                    padding_token: Optional[int] = None, extra_outputs: Optional[Dict[str, str]] = None,
                    seed: Optional[int] = None):
    """Sample `length` tokens after `context` [b, c] (which may hold padding tokens) at `temperature` (> 0, checked
    where it enters: task.policy.temperature or sample.py's --temperature; e.g. 1e-4 is near-greedy).

    extra_outputs: {result key: model output}, e.g. {"values": "value"}: the model output at the position
        whose logits produced each sampled token.
    seed: None (TensorFlow's stateful random numbers), an int (the op-level seed of the stateful sampling op,
        which with the graph seed makes a sequence of runs repeatable), or an int tensor [2] — a stateless
        seed: the tokens then depend only on the seed and the inputs, not on what ran before, so a resumed run
        samples exactly what the uninterrupted run would have (the trainers derive it from run seed, rank and
        update index).

    Returns a dict: `tokens` [b, length], `logprobs` [b, length] and one [b, length] tensor per extra output.
    """
    _check_options(length, top_k, top_p)
    if top_k > model.hparams.n_vocab:
        raise ValueError(f"sample_sequence: top_k={top_k} exceeds the vocabulary ({model.hparams.n_vocab} tokens)")
    extra_outputs = dict(extra_outputs or {})
    context = tf.convert_to_tensor(context, dtype=tf.int32)
    batch_size = context.shape.as_list()[0]  # static or None

    stateless = seed is not None and not isinstance(seed, int)
    if stateless:
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)  # [2]

    def choose(logits, step):
        """logits [b, V] -> sampled tokens [b] and their log-probabilities [b] at this temperature."""
        scaled = logits / temperature
        filtered = scaled
        if top_k:
            filtered = take_top_k(filtered, top_k)
        if top_p < 1:
            filtered = take_top_p(filtered, top_p)
        if stateless:  # a seed of its own for each token position
            step_seed = seed + tf.stack([tf.constant(0, tf.int64), tf.cast(step, tf.int64) * 7919])
            tokens = tf.random.stateless_categorical(filtered, 1, seed=step_seed, dtype=tf.int32)[:, 0]
        else:
            tokens = tf.random.categorical(filtered, 1, dtype=tf.int32, seed=seed)[:, 0]
        return tokens, logprobs_of(tf.nn.log_softmax(scaled), tokens)

    def step_outputs(output):
        """The last position's logits [b, V] and extra outputs {key: [b]}."""
        return output["lm_logits"][:, -1], {key: output[name][:, -1] for key, name in extra_outputs.items()}

    with tf.name_scope("sample_sequence"):
        first = model(context, padding_token=padding_token, logits_for_last=1)
        logits, extras = step_outputs(first)

        def body(i, past, past_tokens, logits, extras, token_array, logprob_array, extra_arrays):
            tokens, logprobs = choose(logits, i)
            token_array, logprob_array = token_array.write(i, tokens), logprob_array.write(i, logprobs)
            extra_arrays = {key: extra_arrays[key].write(i, extras[key]) for key in extra_outputs}
            output = model(tokens[:, None], past=list(past), past_tokens=past_tokens, padding_token=padding_token,
                           logits_for_last=1)
            logits, extras = step_outputs(output)
            return (i + 1, tuple(output["cache"]),
                    tf.concat([past_tokens, tokens[:, None]], axis=1), logits, extras,
                    token_array, logprob_array, extra_arrays)

        def new_array(dtype):
            return tf.TensorArray(dtype, size=length, element_shape=[batch_size])

        # The cache as one (keys, values) pair per layer, each [b, h, p, d]: a step appends to each (one copy of
        # the cache) where a stacked [b, n_layer, 2, h, p, d] tensor was split apart and joined again (four).
        loop_vars = (tf.constant(0), tuple(first["cache"]), context, logits, extras, new_array(tf.int32),
                     new_array(tf.float32), {key: new_array(tf.float32) for key in extra_outputs})
        layer_shape = tf.TensorShape(past_shape(model.hparams, batch_size)[:1] + past_shape(model.hparams)[3:])
        invariants = (tf.TensorShape([]), tuple((layer_shape, layer_shape) for _ in range(model.hparams.n_layer)),
                      tf.TensorShape([batch_size, None]), logits.shape, {k: v.shape for k, v in extras.items()},
                      tf.TensorShape(None), tf.TensorShape(None), {k: tf.TensorShape(None) for k in extra_outputs})
        # The last token needs no model step after it: the loop takes length - 1 steps, the last sample follows.
        i, _, _, logits, extras, token_array, logprob_array, extra_arrays = tf.while_loop(
            cond=lambda i, *_: i < length - 1, body=body, loop_vars=loop_vars, shape_invariants=invariants,
            maximum_iterations=length - 1, back_prop=False)
        tokens, logprobs = choose(logits, i)
        results = {"tokens": token_array.write(i, tokens), "logprobs": logprob_array.write(i, logprobs),
                   **{key: extra_arrays[key].write(i, extras[key]) for key in extra_outputs}}
        # [length, b] -> [b, length]; nothing flows back through sampling.
        return {key: tf.stop_gradient(_batch_major(array.stack())) for key, array in results.items()}


def _batch_major(stacked):
    """[length, b] -> [b, length]. int32 tokens are moved as float32 bits: CPUs without AVX-512 have no oneDNN int32
    transpose, and TensorFlow prints an error-level notice the first time it falls back (the values are the same)."""
    if stacked.dtype != tf.int32:
        return tf.transpose(stacked)
    return tf.bitcast(tf.transpose(tf.bitcast(stacked, tf.float32)), tf.int32)
