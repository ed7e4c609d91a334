"""The GPT-2 transformer in TF1 graph style, with scalar heads, padding semantics and a key/value cache.

Variables carry the names of the 2019 checkpoints under the model's scope:
`model/wte`, `model/wpe`, `model/h{L}/{ln_1,attn/c_attn,attn/c_proj,ln_2,mlp/c_fc,mlp/c_proj}/...`,
`model/ln_f/{g,b}`, and one `model/heads/<name>/{w [n_embd], b []}` per scalar head.

Padding semantics. The padding token never reaches the network. A padded position is computed *as if it
were the last real token before it*: it is fed that token, at that token's position, and it attends to
the same keys (the real tokens up to it). Every layer then computes exactly what it computed at the real
position, so the output at a pad equals the output at the last real token before it, also when that
token sits in the cache (incremental decoding). Pads are never keys, and position ids count real tokens
only, so a sequence gives the same outputs for its real tokens wherever its pads sit. A pad with no real
token before it (left padding) is fed token 0 at position 0 and attends only to itself.

Mixed precision. With `compute_dtype=tf.bfloat16` the variables stay float32 (checkpoints are unchanged) and
are cast at use: the residual stream, the matmuls (the output layer's included), attention scores and GELU
run in bfloat16, while layer-norm statistics, the attention softmax, the final layer norm (`hidden`) and the
scalar heads that read it, the output logits and everything computed from them (log-probabilities,
entropies) are float32. The key/value cache (`present`) is in the compute dtype.
"""

from typing import Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow.compat.v1 as tf

# GPT-2's shape is declared in hparams.py, which needs no TensorFlow; `model.HParams` is its old name.
from lm_human_preferences.hparams import LAYER_NORM_EPSILON, ModelHParams as HParams  # noqa: F401

# Added to the attention logits of forbidden keys: exp() of it underflows to exactly 0.
MASKED_LOGIT = -1e10
# Dtypes the transformer may compute in; variables are always float32.
COMPUTE_DTYPES = ("float32", "bfloat16")


def past_shape(hparams: HParams, batch_size=None, sequence=None):
    """Shape of the key/value cache: [batch, n_layer, 2 (k, v), n_head, sequence, head_size]."""
    return [batch_size, hparams.n_layer, 2, hparams.n_head, sequence, hparams.head_size]


# ----- small pieces ---------------------------------------------------------------------------------------------

def shape_list(x):
    """Static dimensions where known, dynamic ones otherwise."""
    static = x.shape.as_list()
    dynamic = tf.shape(x)
    return [dynamic[i] if size is None else size for i, size in enumerate(static)]


def gelu(x):
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1 + tf.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x * x * x)))


def dropout(x, rate, do_dropout):
    return tf.nn.dropout(x, rate=rate) if do_dropout and rate > 0 else x


def norm(x, scope):
    """Layer norm over the last axis with a learned gain `g` and bias `b`. The statistics are taken in
    float32 whatever x's dtype (a bfloat16 variance loses too much); the result has x's dtype."""
    with tf.variable_scope(scope):
        n_state = x.shape.as_list()[-1]
        g = tf.get_variable("g", [n_state], initializer=tf.ones_initializer())
        b = tf.get_variable("b", [n_state], initializer=tf.zeros_initializer())
        x32 = tf.cast(x, tf.float32)
        mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
        return tf.cast((x32 - mean) * tf.rsqrt(variance + LAYER_NORM_EPSILON) * g + b, x.dtype)


def conv1d(x, scope, n_out, *, w_init_stdev=0.02):
    """Position-wise affine map with GPT-2's variable layout: w [1, n_in, n_out], b [n_out] (float32
    variables, cast to x's dtype at use)."""
    with tf.variable_scope(scope):
        *start, n_in = shape_list(x)
        w = tf.get_variable("w", [1, n_in, n_out], initializer=tf.random_normal_initializer(stddev=w_init_stdev))
        b = tf.get_variable("b", [n_out], initializer=tf.zeros_initializer())
        out = tf.matmul(tf.reshape(x, [-1, n_in]), tf.cast(w[0], x.dtype)) + tf.cast(b, x.dtype)
        return tf.reshape(out, start + [n_out])


def split_heads(x, n_head):
    """[batch, sequence, features] -> [batch, heads, sequence, features / heads]"""
    *start, n_state = shape_list(x)
    return tf.transpose(tf.reshape(x, start + [n_head, n_state // n_head]), [0, 2, 1, 3])


def merge_heads(x):
    """[batch, heads, sequence, head_size] -> [batch, sequence, heads * head_size]"""
    batch, n_head, sequence, head_size = shape_list(x)
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [batch, sequence, n_head * head_size])


# ----- the transformer ------------------------------------------------------------------------------------------

def attn(x, scope, *, past, attention_bias, hparams: HParams, do_dropout):
    """Masked multi-head self-attention. x [b, t, e]; past [b, 2, h, p, d], a pair (keys, values) of
    [b, h, p, d], or None; attention_bias [b or 1, 1, t, p + t] (0 where a query may see a key, MASKED_LOGIT
    elsewhere). Returns the output [b, t, e], this chunk's keys and values, present [b, 2, h, t, d], and
    the pair (keys, values) of every position, each [b, h, p + t, d]."""
    with tf.variable_scope(scope):
        qkv = conv1d(x, "c_attn", 3 * hparams.n_embd)
        q, k, v = (split_heads(part, hparams.n_head) for part in tf.split(qkv, 3, axis=2))  # each [b, h, t, d]
        present = tf.stack([k, v], axis=1)
        if past is not None:
            past_k, past_v = past if isinstance(past, tuple) else tf.unstack(past, axis=1)
            k = tf.concat([past_k, k], axis=-2)  # [b, h, p + t, d]
            v = tf.concat([past_v, v], axis=-2)
        q = q * (1 / np.sqrt(hparams.head_size))
        scores = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32)  # [b, h, t, p + t]
        weights = tf.nn.softmax(scores + attention_bias)  # float32: the mask and the normaliser need the range
        weights = dropout(tf.cast(weights, v.dtype), hparams.attn_pdrop, do_dropout)
        a = merge_heads(tf.matmul(weights, v))  # [b, t, e]
        a = conv1d(a, "c_proj", hparams.n_embd)
        return dropout(a, hparams.resid_pdrop, do_dropout), present, (k, v)


def mlp(x, scope, *, hparams: HParams, do_dropout):
    with tf.variable_scope(scope):
        h = gelu(conv1d(x, "c_fc", 4 * hparams.n_embd))  # [b, t, 4e]
        return dropout(conv1d(h, "c_proj", hparams.n_embd), hparams.resid_pdrop, do_dropout)


def block(x, scope, *, past, attention_bias, hparams: HParams, do_dropout):
    """One pre-layer-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""
    with tf.variable_scope(scope):
        a, present, keys_values = attn(norm(x, "ln_1"), "attn", past=past, attention_bias=attention_bias,
                                       hparams=hparams, do_dropout=do_dropout)
        x = x + a
        x = x + mlp(norm(x, "ln_2"), "mlp", hparams=hparams, do_dropout=do_dropout)
        return x, present, keys_values


def causal_mask(query_length, key_length):
    """[t, s] bool: query i (the last t of s positions) may see key j <= its own position."""
    i = tf.range(query_length)[:, None] + (key_length - query_length)
    return i >= tf.range(key_length)[None, :]


def plain_inputs(X, past):
    """Every token real: X [b, t] after a cache of p positions -> tokens [b, t], position ids [1, t] and the
    causal attention bias [1, 1, t, p + t]."""
    length = shape_list(X)[1]
    past_length = 0 if past is None else tf.shape(past if not isinstance(past, list) else past[0][0])[-2]
    positions = past_length + tf.range(length)[None, :]
    return X, positions, tf.where_v2(causal_mask(length, past_length + length), 0.0, MASKED_LOGIT)[None, None]


def padding_inputs(X, past_tokens, padding_token):
    """What the network is fed under the padding semantics (see the module docstring).

    X [b, t]; past_tokens [b, p] (the tokens behind the cache) or None. Returns the tokens to embed [b, t],
    their position ids [b, t] and the attention bias [b, 1, t, p + t]."""
    length = shape_list(X)[1]
    all_tokens = X if past_tokens is None else tf.concat([past_tokens, X], axis=1)  # [b, s], s = p + t
    key_length = tf.shape(all_tokens)[1]
    past_length = key_length - length
    real = tf.not_equal(all_tokens, padding_token)  # [b, s]
    sees = tf.logical_and(causal_mask(length, key_length)[None], real[:, None, :])  # [b, t, s]
    # A pad computes what the last real token before it computed: that token, at its position, same keys.
    last_real = tf.reduce_max(tf.where_v2(sees, tf.range(key_length), -1), axis=2)  # [b, t], -1: none yet
    tokens = tf.gather(tf.where_v2(real, all_tokens, 0), tf.maximum(last_real, 0), batch_dims=1)  # [b, t]
    real_count = tf.reduce_sum(tf.cast(real[:, :past_length], tf.int32), axis=1, keepdims=True) + \
        tf.cumsum(tf.cast(real[:, past_length:], tf.int32), axis=1)  # [b, t]: real tokens up to each position
    positions = tf.maximum(real_count - 1, 0)
    # A pad before any real token has no key to look at; it looks at itself (and is never a key for others).
    is_self = tf.equal(tf.range(key_length)[None, :], tf.range(length)[:, None] + past_length)  # [t, s]
    alone = tf.logical_and((last_real < 0)[:, :, None], is_self[None])
    visible = tf.logical_or(sees, alone)  # [b, t, s]
    return tokens, positions, tf.where_v2(visible, 0.0, MASKED_LOGIT)[:, None]


def tied_logits(h, wte, *, one_position: bool):
    """h [n, e] · wteᵀ -> logits [n, n_vocab]. With one position per sequence (a sampling step) n is the batch,
    and the product is computed as (wte · hᵀ)ᵀ: a pass over wte's rows that was 6x faster than h · wteᵀ on a
    CPU for GPT-2 124M at batch 2 (Eigen's kernels); the extra transpose of [batch, n_vocab] is small."""
    if one_position:
        return tf.transpose(tf.matmul(wte, h, transpose_b=True))  # [n, n_vocab]
    return tf.matmul(h, wte, transpose_b=True)


def checked_compute_dtype(compute_dtype):
    """tf.float32 or tf.bfloat16 (a dtype or its name); ValueError for anything else."""
    try:
        dtype = tf.as_dtype(compute_dtype)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.name not in COMPUTE_DTYPES:
        raise ValueError(f"Model: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    return dtype


class Model:
    """GPT-2 with optional scalar heads. Variables live under the variable scope current at construction
    plus `scope` (e.g. `policy/model`); every call reuses them."""

    def __init__(self, hparams: HParams, scalar_heads: Union[Sequence[str], Mapping[str, object]] = (),
                 scope: Optional[str] = "model", *, compute_dtype=tf.float32):
        """scalar_heads: head names, or {name: initializer of its weight w} (None: the default, a normal with std
        1/sqrt(n_embd + 1), as in 2019; the policy's value head starts at zero). compute_dtype: tf.float32
        (default) or tf.bfloat16 for mixed precision (see the module docstring)."""
        self.hparams = hparams
        self.scalar_heads = dict(scalar_heads) if isinstance(scalar_heads, Mapping) else dict.fromkeys(scalar_heads)
        self.compute_dtype = checked_compute_dtype(compute_dtype)
        with tf.variable_scope(scope, default_name="model") as variable_scope:
            self.scope = variable_scope

    def __call__(self, X, *, past=None, past_tokens=None, padding_token: Optional[int] = None,
                 do_dropout=False, logits_for_last: Optional[int] = None):
        """Run the transformer on tokens X [b, t] that follow `past` (the cache of earlier tokens).

        past: [b, n_layer, 2, n_head, p, head_size], the concatenated `present`s of earlier calls; or the
            same as a list of n_layer pairs (keys, values) of [b, n_head, p, head_size], the `cache` output of
            the previous call, which saves splitting the cache apart again each call (a sampling step then
            copies the cache once, to append its keys, instead of four times).
        past_tokens: [b, p], the tokens those calls were given; needed with `padding_token` and `past`.
        padding_token: tokens equal to it get the padding semantics; None: every token is real.
        logits_for_last: compute `lm_logits` for the last N positions only (a response's log-probs never
            need the context's logits, and the output layer is the largest matmul).

        Returns a dict: `lm_logits` [b, t or N, n_vocab], `hidden` [b, t, n_embd] (after ln_f),
        `present` [b, n_layer, 2, n_head, t, head_size], `cache` (the list of n_layer pairs (keys, values) of
        every position, past and new, each [b, n_head, p + t, head_size]), and one [b, t] tensor per scalar
        head; all float32 except `present` and `cache`, which are in the compute dtype (feed them back as
        `past`).
        """
        hp = self.hparams
        if padding_token is not None and past is not None and past_tokens is None:
            raise ValueError("Model: past_tokens (the tokens behind `past`) are required when both `past` and "
                             "`padding_token` are given")
        X = tf.convert_to_tensor(X, dtype=tf.int32)
        if isinstance(past, (list, tuple)):
            if len(past) != hp.n_layer:
                raise ValueError(f"Model: past as a list holds one (keys, values) pair per layer ({hp.n_layer}), "
                                 f"got {len(past)}")
            past = [tuple(tf.cast(part, self.compute_dtype) for part in pair) for pair in past]
        elif past is not None:
            past = tf.cast(past, self.compute_dtype)
        with tf.variable_scope(self.scope, reuse=tf.AUTO_REUSE):
            wte = tf.get_variable("wte", [hp.n_vocab, hp.n_embd], initializer=tf.random_normal_initializer(stddev=0.02))
            wpe = tf.get_variable("wpe", [hp.n_ctx, hp.n_embd], initializer=tf.random_normal_initializer(stddev=0.01))
            # One dense read of each embedding serves the lookup and the output layer. A lookup straight from
            # the variable (a sparse read) switches it to copy-on-read, after which every dense read copies it:
            # 150 MB and ~0.1 s per sampling step for GPT-2 124M on a CPU (measured by bench.py).
            wte, wpe = tf.convert_to_tensor(wte), tf.convert_to_tensor(wpe)
            if padding_token is None:
                tokens, positions, attention_bias = plain_inputs(X, past)
            else:
                tokens, positions, attention_bias = padding_inputs(X, past_tokens, padding_token)
            h = tf.cast(tf.gather(wte, tokens) + tf.gather(wpe, positions), self.compute_dtype)  # [b, t, e]
            h = dropout(h, hp.embd_pdrop, do_dropout)
            if isinstance(past, list):
                pasts = past
            else:
                pasts = tf.unstack(past, num=hp.n_layer, axis=1) if past is not None else [None] * hp.n_layer
            presents, cache = [], []
            for layer, layer_past in enumerate(pasts):
                h, present, keys_values = block(h, f"h{layer}", past=layer_past, attention_bias=attention_bias,
                                                hparams=hp, do_dropout=do_dropout)
                presents.append(present)
                cache.append(keys_values)
            hidden = norm(tf.cast(h, tf.float32), "ln_f")  # [b, t, e], float32 for the heads
            h = tf.cast(hidden, self.compute_dtype)

            results = {"hidden": hidden, "present": tf.stack(presents, axis=1), "cache": cache}
            logits_h = h if logits_for_last is None else h[:, -logits_for_last:]
            logits_batch, logits_length = shape_list(logits_h)[:2]
            # tied embeddings; the largest matmul, so in the compute dtype
            logits = tied_logits(tf.reshape(logits_h, [-1, hp.n_embd]), tf.cast(wte, self.compute_dtype),
                                 one_position=logits_for_last == 1)
            results["lm_logits"] = tf.reshape(tf.cast(logits, tf.float32), [logits_batch, logits_length, hp.n_vocab])
            for name, initializer in self.scalar_heads.items():
                results[name] = self._scalar_head(name, initializer, dropout(hidden, hp.head_pdrop, do_dropout))
            return results

    def _scalar_head(self, name, initializer, h):
        """A linear readout of the final hidden state: w [n_embd] (from `initializer`, by default a normal with
        std 1/sqrt(n_embd + 1)), b [] (zero) -> [b, t]."""
        n_embd = self.hparams.n_embd
        initializer = initializer or tf.random_normal_initializer(stddev=1 / np.sqrt(n_embd + 1))
        with tf.variable_scope(f"heads/{name}"):
            w = tf.get_variable("w", [n_embd], initializer=initializer)
            b = tf.get_variable("b", [], initializer=tf.zeros_initializer())
            return tf.tensordot(h, w, axes=[[2], [0]]) + b

    def get_params(self):
        """The trainable variables of this model (call it once first so they exist)."""
        return tf.trainable_variables(self.scope.name + "/")
