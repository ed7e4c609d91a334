"""Policy: variables, analyze_responses against an independent computation, respond/analyze consistency."""

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy

PAD = 27  # the `test` encoding's padding token
PREFIX, SUFFIX = [26], [0]  # what a task's query_prefix / query_suffix would add


def embed_queries(queries):
    batch = tf.shape(queries)[0]
    return tf.concat([tf.fill([batch, len(PREFIX)], PREFIX[0]), queries, tf.fill([batch, len(SUFFIX)], SUFFIX[0])],
                     axis=1)


def randomize(sess, variables, seed=0):
    """Weights (value head included) large enough that distributions and values are far from trivial."""
    rng = np.random.RandomState(seed)
    for var in variables:
        value = rng.normal(size=var.shape.as_list()) * 0.5 + (1.0 if var.op.name.endswith("/g") else 0.0)
        var.load(value.astype(np.float32), sess)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


QUERIES = np.array([[1, 2, 3], [4, 5, PAD], [6, PAD, PAD]], np.int32)  # right-padded, as the tasks make them
RESPONSES = np.array([[7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18]], np.int32)


def test_variables():
    policy = Policy(TrainedModel("test"), scope="policy")
    names = {v.op.name for v in policy.get_params()}
    assert {"policy/model/wte", "policy/model/wpe", "policy/model/h1/attn/c_attn/w", "policy/model/ln_f/g",
            "policy/model/heads/value/w", "policy/model/heads/value/b"} <= names
    assert len(names) == 4 + 12 * 2 + 2
    assert names == {v.op.name for v in tf.global_variables()}


def test_analyze_responses_scores_each_token_given_the_unpadded_context():
    temperature = 0.6
    policy = Policy(TrainedModel("test"), scope="policy", temperature=temperature, embed_queries=embed_queries)
    # Reference: the bare model on each row's real tokens only, no padding involved.
    tokens = tf.placeholder(tf.int32, [1, None])
    reference = policy.model(tokens)
    with tf.Session() as sess, sess.as_default():
        sess.run(tf.global_variables_initializer())
        randomize(sess, policy.get_params())
        got = policy.analyze_responses(QUERIES, RESPONSES)
        for row in range(len(QUERIES)):
            context = PREFIX + [t for t in QUERIES[row] if t != PAD] + SUFFIX
            # The last response token predicts nothing scored (and 9 tokens would exceed n_ctx = 8).
            out = sess.run(reference, {tokens: [context + list(RESPONSES[row, :-1])]})
            at = slice(len(context) - 1, None)  # the positions whose logits predict the response tokens
            logp = log_softmax(out["lm_logits"][0, at] / temperature)  # [R, V]
            np.testing.assert_allclose(got["logprobs"][row], logp[np.arange(4), RESPONSES[row]], atol=1e-4)
            np.testing.assert_allclose(got["entropies"][row], -(np.exp(logp) * logp).sum(-1), atol=1e-4)
            np.testing.assert_allclose(got["values"][row], out["value"][0, at], atol=1e-5)
    assert {k: v.shape for k, v in got.items()} == {k: (3, 4) for k in ("logprobs", "entropies", "values")}
    assert np.ptp(got["values"]) > 0.1


def test_respond_logprobs_and_values_match_analyze_responses():
    policy = Policy(TrainedModel("test"), scope="policy", temperature=0.8, embed_queries=embed_queries)
    with tf.Session() as sess, sess.as_default():
        sess.run(tf.global_variables_initializer())
        randomize(sess, policy.get_params())
        rollout = policy.respond(QUERIES, 4)
        again = policy.analyze_responses(QUERIES, rollout["responses"])
    assert rollout["responses"].shape == (3, 4) and rollout["responses"].dtype == np.int32
    assert rollout["responses"].max() < 27
    np.testing.assert_allclose(rollout["logprobs"], again["logprobs"], atol=1e-4)
    np.testing.assert_allclose(rollout["values"], again["values"], atol=1e-5)


def test_fresh_value_head_outputs_zero():
    policy = Policy(TrainedModel("test"), scope="policy")
    with tf.Session() as sess, sess.as_default():
        sess.run(tf.global_variables_initializer())
        assert np.all(policy.respond(QUERIES, 3)["values"] == 0)


def test_numpy_calls_build_their_graph_once_per_shape():
    policy = Policy(TrainedModel("test"), scope="policy")
    graph = tf.get_default_graph()
    with tf.Session() as sess, sess.as_default():
        sess.run(tf.global_variables_initializer())
        policy.respond(QUERIES, 3)
        policy.analyze_responses(QUERIES, RESPONSES)
        ops = len(graph.get_operations())
        policy.respond(QUERIES[:2], 3)  # another batch size: same graph
        policy.analyze_responses(QUERIES[:1], RESPONSES[:1])
        assert len(graph.get_operations()) == ops
        policy.respond(QUERIES, 2)  # another length: a new graph
        assert len(graph.get_operations()) > ops


def test_errors():
    policy = Policy(TrainedModel("test"), scope="policy2")
    with pytest.raises(ValueError, match="default session"):
        policy.respond(QUERIES, 2)
    with tf.Session() as sess, sess.as_default():
        with pytest.raises(ValueError, match=r"responses: expected an integer array \[batch, length\]"):
            policy.analyze_responses(QUERIES, RESPONSES[0])
        with pytest.raises(ValueError, match="3 queries but 2 responses"):
            policy.analyze_responses(QUERIES, RESPONSES[:2])


def test_a_stateless_seed_makes_the_sample_a_function_of_the_seed_alone():
    """What resuming a run needs: the same seed gives the same tokens whatever ran before, in a new graph too."""
    def sample_with(seeds, warm_up_draws):
        with tf.Graph().as_default():
            policy = Policy(TrainedModel("test"), scope="policy", temperature=1.0, embed_queries=embed_queries)
            queries = tf.constant(np.repeat(QUERIES, 8, axis=0))
            seed = tf.placeholder(tf.int64, [2])
            rollout = policy.respond_op(queries, 4, seed=seed)
            unseeded = policy.respond_op(queries, 4)
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                randomize(sess, policy.get_params())
                for _ in range(warm_up_draws):  # other random ops ran before: no effect on the seeded sample
                    sess.run(unseeded["responses"])
                return [sess.run(rollout, {seed: s}) for s in seeds]

    first = sample_with([(1, 5), (1, 6)], warm_up_draws=0)
    again = sample_with([(1, 5)], warm_up_draws=3)
    np.testing.assert_array_equal(first[0]["responses"], again[0]["responses"])
    np.testing.assert_allclose(first[0]["logprobs"], again[0]["logprobs"], rtol=1e-6)
    assert not np.array_equal(first[0]["responses"], first[1]["responses"])  # another seed, another sample
    tokens = first[0]["responses"]
    assert len({tuple(row) for row in tokens}) > 3, tokens  # rows and positions still vary within a sample
