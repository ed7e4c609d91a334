"""Optimizer: TF1 Adam against a numpy reference, micro-batch accumulation, averaging across MPI ranks."""

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences.utils import train_ops

from mpi_programs import allreduce_env, run
from mpi_programs.train_ops_ranks import BATCH, EPSILON, LR, STEPS, build, data, initial_values, train


def regression_gradients(w, b, x, y):
    """Gradients of mean((x @ w + b - y)^2) over all [n, 2] entries, in float64."""
    residual = x.astype(np.float64) @ w + b - y  # [n, 2]
    scale = 2.0 / residual.size
    return [scale * x.T.astype(np.float64) @ residual, scale * residual.sum(axis=0)]


def adam_reference(lr, epsilon, *, torch_style=False, beta1=0.9, beta2=0.999):
    """STEPS updates of the regression in numpy, on the whole batch of each step.

    TF1 Adam: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); p -= lr_t * m / (sqrt(v) + eps) (epsilon outside the
    bias correction). torch_style puts epsilon after correcting v, to show the test tells them apart.
    """
    params = [p.astype(np.float64) for p in initial_values()]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, STEPS + 1):
        grads = regression_gradients(*params, *data(t - 1))
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            if torch_style:
                m_hat, v_hat = m[i] / (1 - beta1 ** t), v[i] / (1 - beta2 ** t)
                params[i] = params[i] - lr * m_hat / (np.sqrt(v_hat) + epsilon)
            else:
                lr_t = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                params[i] = params[i] - lr_t * m[i] / (np.sqrt(v[i]) + epsilon)
    return params


def train_in_graph(micro_batches):
    """Train the regression in a fresh graph on whole batches; returns ([w, b], accumulators)."""
    with tf.Graph().as_default(), tf.Session() as sess:
        x, y, params, optimizer = build(micro_batches)
        sess.run(tf.global_variables_initializer())
        train(sess, x, y, optimizer, np.arange(BATCH))
        accumulators = [v for v in optimizer.variables if "/accumulators/" in v.name]
        return sess.run(params), sess.run(accumulators)


def test_adam_matches_tf1_numpy_reference():
    (w, b), _ = train_in_graph(micro_batches=1)
    ref_w, ref_b = adam_reference(LR, EPSILON)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, ref_b, rtol=1e-5, atol=1e-6)
    # The reference is sharp enough to reject PyTorch-style Adam (epsilon inside the bias correction).
    torch_w, _ = adam_reference(LR, EPSILON, torch_style=True)
    assert np.max(np.abs(torch_w - ref_w)) > 1e-3


def test_four_micro_batches_equal_one_full_batch():
    (w1, b1), accumulators1 = train_in_graph(micro_batches=1)
    (w4, b4), accumulators4 = train_in_graph(micro_batches=4)
    assert accumulators1 == []  # micro_batches=1 applies directly, without accumulators
    assert len(accumulators4) == 2 and all(not a.any() for a in accumulators4)  # zeroed after each apply
    np.testing.assert_allclose(w4, w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b4, b1, rtol=1e-5, atol=1e-6)
    # Both moved far more than the tolerance (the equality is not that of untouched parameters).
    assert np.max(np.abs(w1 - initial_values()[0])) > 1e-2


def test_optimizer_variables_are_kept_apart_from_the_model():
    x, y, params, optimizer = build(micro_batches=2)
    assert tf.trainable_variables() == params
    assert optimizer.variables and all(v.name.startswith("optimizer/") for v in optimizer.variables)
    assert not set(optimizer.variables) & set(tf.trainable_variables())
    second = train_ops.Optimizer(tf.reduce_sum(params[1]), params[1:], 0.1)
    assert second.scope == "optimizer_1"


def test_bad_arguments():
    w = tf.get_variable("w", [2])
    other = tf.get_variable("other", [2])
    with pytest.raises(ValueError, match="does not depend"):
        train_ops.Optimizer(tf.reduce_sum(w), [other], 0.1)
    optimizer = train_ops.Optimizer(tf.reduce_sum(w), [w], 0.1, micro_batches=2)
    with pytest.raises(ValueError, match="got 1 micro-batch feeds, built for micro_batches=2"):
        optimizer.step(None, [{}])


@pytest.mark.parametrize("allreduce", ["mpi4py", "horovod"])
def test_two_ranks_on_half_batches_equal_one_process_on_the_whole(tmp_path, allreduce):
    result = run(2, "train_ops_ranks.py", tmp_path, env=allreduce_env(allreduce))
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("gradient all-reduce:") == 1  # said once, by rank 0
    assert f"gradient all-reduce: {allreduce} across 2 ranks" in result.stdout
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for name in ["w", "b"]:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name])  # ranks stay identical
    (w, b), _ = train_in_graph(micro_batches=1)
    np.testing.assert_allclose(ranks[0]["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ranks[0]["b"], b, rtol=1e-5, atol=1e-6)
