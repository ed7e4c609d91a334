"""The GPT-2 graph against a plain-numpy reference, its variable names, the cache and the padding semantics."""

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences.language import model as lm_model
from lm_human_preferences.utils.hyperparams import HParamError

HP = lm_model.HParams(n_vocab=27, n_ctx=16, n_embd=8, n_head=2, n_layer=2)
PAD = 27  # one past the vocabulary, as for the `test` encoding


def build(scalar_heads=("value", "reward"), scope="policy"):
    with tf.variable_scope(scope):
        return lm_model.Model(HP, scalar_heads=list(scalar_heads), scope="model")


def randomize(sess, seed=0):
    """Give every variable a random value of a size that makes each block matter (init values are tiny)."""
    rng = np.random.RandomState(seed)
    for var in tf.global_variables():
        shape = var.shape.as_list()
        value = rng.normal(size=shape) * 0.3
        if var.op.name.endswith("/g"):
            value += 1.0
        var.load(value.astype(np.float32), sess)
    return {var.op.name: sess.run(var) for var in tf.global_variables()}


# ----- plain numpy reference ------------------------------------------------------------------------------------

def np_layer_norm(x, g, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * g + b


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_attention(x, p, n_head):
    t, e = x.shape
    d = e // n_head
    qkv = x @ p["c_attn/w"][0] + p["c_attn/b"]
    q, k, v = np.split(qkv, 3, axis=-1)
    out = np.zeros_like(x)
    for head in range(n_head):
        cols = slice(head * d, (head + 1) * d)
        scores = q[:, cols] @ k[:, cols].T / np.sqrt(d)  # [t, t]
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, cols] = weights @ v[:, cols]
    return out @ p["c_proj/w"][0] + p["c_proj/b"]


def np_gpt2(params, tokens, scope="policy/model"):
    """One unpadded sequence [t] -> hidden [t, e], logits [t, v], heads {name: [t]}."""
    p = lambda name: params[f"{scope}/{name}"]  # noqa: E731
    h = p("wte")[tokens] + p("wpe")[np.arange(len(tokens))]
    for layer in range(HP.n_layer):
        blk = {name[len(f"{scope}/h{layer}/"):]: value for name, value in params.items()
               if name.startswith(f"{scope}/h{layer}/")}
        attn = {name[len("attn/"):]: value for name, value in blk.items() if name.startswith("attn/")}
        h = h + np_attention(np_layer_norm(h, blk["ln_1/g"], blk["ln_1/b"]), attn, HP.n_head)
        x = np_layer_norm(h, blk["ln_2/g"], blk["ln_2/b"])
        h = h + np_gelu(x @ blk["mlp/c_fc/w"][0] + blk["mlp/c_fc/b"]) @ blk["mlp/c_proj/w"][0] + blk["mlp/c_proj/b"]
    h = np_layer_norm(h, p("ln_f/g"), p("ln_f/b"))
    heads = {name: h @ p(f"heads/{name}/w") + p(f"heads/{name}/b") for name in ("value", "reward")}
    return h, h @ p("wte").T, heads


# ----- tests ----------------------------------------------------------------------------------------------------

def test_variable_names_and_shapes_match_the_2019_checkpoints():
    model = build()
    model(tf.zeros([1, 3], tf.int32))
    model(tf.zeros([2, 5], tf.int32), padding_token=PAD)  # a second call reuses, never adds
    shapes = {v.op.name: v.shape.as_list() for v in tf.global_variables()}
    expected = {"policy/model/wte": [27, 8], "policy/model/wpe": [16, 8],
                "policy/model/ln_f/g": [8], "policy/model/ln_f/b": [8],
                "policy/model/heads/value/w": [8], "policy/model/heads/value/b": [],
                "policy/model/heads/reward/w": [8], "policy/model/heads/reward/b": []}
    for layer in range(2):
        h = f"policy/model/h{layer}"
        expected.update({
            f"{h}/ln_1/g": [8], f"{h}/ln_1/b": [8], f"{h}/ln_2/g": [8], f"{h}/ln_2/b": [8],
            f"{h}/attn/c_attn/w": [1, 8, 24], f"{h}/attn/c_attn/b": [24],
            f"{h}/attn/c_proj/w": [1, 8, 8], f"{h}/attn/c_proj/b": [8],
            f"{h}/mlp/c_fc/w": [1, 8, 32], f"{h}/mlp/c_fc/b": [32],
            f"{h}/mlp/c_proj/w": [1, 32, 8], f"{h}/mlp/c_proj/b": [8]})
    assert shapes == expected
    assert sorted(v.op.name for v in model.get_params()) == sorted(expected)


def test_initialisation():
    hp = lm_model.HParams(n_vocab=500, n_ctx=300, n_embd=64, n_head=4, n_layer=1)
    model = lm_model.Model(hp, scalar_heads={"value": tf.zeros_initializer(), "reward": None})  # the policy's, 2019's
    model(tf.zeros([1, 2], tf.int32))
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        values = {v.op.name: sess.run(v) for v in tf.global_variables()}
    assert np.std(values["model/wte"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(values["model/wpe"]) == pytest.approx(0.01, rel=0.05)
    assert np.std(values["model/h0/mlp/c_fc/w"]) == pytest.approx(0.02, rel=0.05)
    assert np.all(values["model/h0/attn/c_attn/b"] == 0)
    assert np.all(values["model/ln_f/g"] == 1) and np.all(values["model/ln_f/b"] == 0)
    assert np.all(values["model/heads/value/w"] == 0) and values["model/heads/value/b"] == 0
    assert np.std(values["model/heads/reward/w"]) == pytest.approx(1 / np.sqrt(65), rel=0.35)
    assert values["model/heads/reward/b"] == 0


def test_forward_pass_matches_numpy_reference():
    model = build()
    tokens = np.random.RandomState(1).randint(0, 27, size=(3, 9)).astype(np.int32)
    out = model(tokens)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        params = randomize(sess)
        got = sess.run(out)
    for row in range(3):
        hidden, logits, heads = np_gpt2(params, tokens[row])
        np.testing.assert_allclose(got["hidden"][row], hidden, atol=1e-4)
        np.testing.assert_allclose(got["lm_logits"][row], logits, atol=1e-4)
        for name in heads:
            np.testing.assert_allclose(got[name][row], heads[name], atol=1e-4)
    assert got["present"].shape == (3, 2, 2, 2, 9, 4)
    assert np.abs(got["lm_logits"]).max() > 1  # the random weights make the comparison non-trivial


def test_logits_for_last_positions_only():
    model = build()
    tokens = np.random.RandomState(2).randint(0, 27, size=(2, 7)).astype(np.int32)
    full, last = model(tokens), model(tokens, logits_for_last=3)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess)
        full, last = sess.run([full["lm_logits"], last["lm_logits"]])
    np.testing.assert_allclose(last, full[:, -3:], atol=1e-6)


def pad_variants(real):
    """The same real tokens with pads left, in the middle, right and everywhere; returns (tokens, real index)."""
    variants = [[PAD, PAD] + real, real[:2] + [PAD, PAD, PAD] + real[2:], real + [PAD, PAD],
                [PAD] + real[:1] + [PAD] + real[1:3] + [PAD, PAD] + real[3:] + [PAD]]
    length = max(map(len, variants))
    rows = [v + [PAD] * (length - len(v)) for v in variants]
    return np.array(rows, np.int32)


def test_pads_anywhere_leave_the_real_outputs_unchanged():
    rng = np.random.RandomState(3)
    real = list(rng.randint(0, 27, size=6))
    padded = pad_variants(real)
    model = build()
    out_real = model(np.array([real], np.int32), padding_token=PAD)
    out_padded = model(padded, padding_token=PAD)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        params = randomize(sess)
        ref, got = sess.run([out_real, out_padded])
    _, ref_logits, _ = np_gpt2(params, np.array(real))
    np.testing.assert_allclose(ref["lm_logits"][0], ref_logits, atol=1e-4)
    for row, tokens in enumerate(padded):
        is_real = tokens != PAD
        for key in ("lm_logits", "hidden", "value", "reward"):
            np.testing.assert_allclose(got[key][row][is_real], ref[key][0], atol=1e-5, err_msg=f"{key} row {row}")
        # A pad's output is the output of the last real token before it.
        for position in np.flatnonzero(~is_real):
            before = np.flatnonzero(is_real[:position])
            if len(before):
                np.testing.assert_allclose(got["lm_logits"][row, position], got["lm_logits"][row, before[-1]],
                                           atol=1e-5)
    # Leading pads see nothing: all of them give the same output, which is not a real token's.
    assert np.allclose(got["lm_logits"][0, 0], got["lm_logits"][0, 1], atol=1e-6)


def test_padding_token_never_reaches_the_embedding():
    """The padding token lies outside the vocabulary (27 here, 50259 for GPT-2): feeding it must not fail."""
    model = build()
    out = model(np.array([[PAD, PAD, PAD], [1, PAD, 2]], np.int32), padding_token=PAD)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        logits = sess.run(out["lm_logits"])
    assert np.all(np.isfinite(logits))


def incremental_outputs(model, tokens, chunks, padding_token):
    """Run the model chunk by chunk through the cache; return the concatenated logits and values."""
    past, past_tokens, logits, values = None, None, [], []
    start = 0
    for size in chunks:
        chunk = tokens[:, start:start + size]
        out = model(chunk, past=past, past_tokens=past_tokens, padding_token=padding_token)
        past = out["present"] if past is None else tf.concat([past, out["present"]], axis=-2)
        past_tokens = chunk if past_tokens is None else tf.concat([past_tokens, chunk], axis=1)
        logits.append(out["lm_logits"])
        values.append(out["reward"])
        start += size
    return tf.concat(logits, axis=1), tf.concat(values, axis=1)


@pytest.mark.parametrize("padding_token", [None, PAD])
def test_incremental_decoding_matches_the_full_pass(padding_token):
    rng = np.random.RandomState(4)
    tokens = rng.randint(0, 27, size=(3, 10)).astype(np.int32)
    if padding_token is not None:
        # Pads in the context, right after a chunk boundary (their last real token is in the cache), leading.
        tokens[0, 3:5] = PAD
        tokens[1, 0:2] = PAD
        tokens[2, 4:7] = PAD
    model = build()
    full = model(tokens, padding_token=padding_token)
    step_logits, step_values = incremental_outputs(model, tf.constant(tokens), [4] + [1] * 6, padding_token)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess)
        full_logits, full_values, step_logits, step_values = sess.run(
            [full["lm_logits"], full["reward"], step_logits, step_values])
    np.testing.assert_allclose(step_logits, full_logits, atol=1e-5)
    np.testing.assert_allclose(step_values, full_values, atol=1e-5)


def test_past_without_past_tokens_is_an_error():
    model = build()
    out = model(tf.zeros([1, 2], tf.int32), padding_token=PAD)
    with pytest.raises(ValueError, match="past_tokens"):
        model(tf.zeros([1, 1], tf.int32), past=out["present"], padding_token=PAD)


def test_dropout_only_when_asked():
    hp = lm_model.HParams(n_vocab=27, n_ctx=16, n_embd=8, n_head=2, n_layer=2, resid_pdrop=0.5)
    model = lm_model.Model(hp)
    tokens = np.arange(6, dtype=np.int32)[None]
    plain, dropped = model(tokens)["lm_logits"], model(tokens, do_dropout=True)["lm_logits"]
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess)
        a, b = sess.run(plain), sess.run(plain)
        c, d = sess.run(dropped), sess.run(dropped)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(c, d)


def test_hparams_from_json():
    data = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "extra": "ignored"}
    hp = lm_model.HParams.from_json_dict(data, where="124M/hparams.json")
    assert (hp.n_vocab, hp.n_ctx, hp.n_embd, hp.n_head, hp.n_layer, hp.embd_pdrop) == (50257, 1024, 768, 12, 12, 0.1)
    with pytest.raises(HParamError, match=r"x/hparams.json: missing n_layer"):
        lm_model.HParams.from_json_dict({k: v for k, v in data.items() if k != "n_layer"}, where="x/hparams.json")
    with pytest.raises(HParamError, match=r"n_embd=768 must be a multiple of .*n_head=5"):
        lm_model.HParams.from_json_dict(dict(data, n_head=5), where="x/hparams.json")
