"""Each rank trains a linear regression on its half of one batch (2 micro-batches per rank) and saves the
parameters; test_train_ops compares them with one process trained on the whole batch.

Also checks broadcast_variables: ranks start from different values and must continue from rank 0's.
"""
import os
import sys

import numpy as np

BATCH = 8  # examples per update, all ranks together
STEPS = 3
LR = 0.05
EPSILON = 0.5  # large, so that a wrongly scaled gradient changes the update (Adam is nearly scale-free)


def data(step):
    """(x [BATCH, 3], y [BATCH, 2]) of update `step`."""
    rng = np.random.RandomState(100 + step)
    return rng.randn(BATCH, 3).astype(np.float32), rng.randn(BATCH, 2).astype(np.float32)


def initial_values():
    rng = np.random.RandomState(0)
    return rng.randn(3, 2).astype(np.float32), rng.randn(2).astype(np.float32)


def build(micro_batches):
    """Placeholders, parameters and optimizer of a linear regression with a mean squared error loss."""
    import tensorflow.compat.v1 as tf
    from lm_human_preferences.utils import train_ops
    w0, b0 = initial_values()
    x = tf.placeholder(tf.float32, [None, 3])
    y = tf.placeholder(tf.float32, [None, 2])
    with tf.variable_scope("regression"):
        w = tf.get_variable("w", initializer=w0)
        b = tf.get_variable("b", initializer=b0)
    loss = tf.reduce_mean(tf.square(tf.matmul(x, w) + b - y))
    optimizer = train_ops.Optimizer(loss, [w, b], LR, epsilon=EPSILON, micro_batches=micro_batches)
    return x, y, [w, b], optimizer


def train(sess, x, y, optimizer, examples):
    """STEPS updates; `examples` picks this process's rows of each batch, split into the micro-batches."""
    for step in range(STEPS):
        xs, ys = data(step)
        feeds = [{x: xs[rows], y: ys[rows]} for rows in np.array_split(examples, optimizer.micro_batches)]
        optimizer.step(sess, feeds)


def main(out_dir):
    import tensorflow.compat.v1 as tf
    from lm_human_preferences.utils import mpi
    tf.disable_eager_execution()
    mpi.install_abort_on_error()
    x, y, params, optimizer = build(micro_batches=2)
    sess = tf.Session()
    sess.run(tf.global_variables_initializer())
    # Different starting points per rank; the broadcast must make them rank 0's.
    for p in params:
        sess.run(p.assign(p + 1000.0 * mpi.rank()))
    mpi.broadcast_variables(sess, params)
    mpi.broadcast_variables(sess, params)  # a second call reuses the same assign ops
    ops_before = len(tf.get_default_graph().get_operations())
    mpi.broadcast_variables(sess, params)
    assert len(tf.get_default_graph().get_operations()) == ops_before, "broadcast_variables added ops again"
    per_rank = mpi.exact_div(BATCH, mpi.size(), "BATCH")
    train(sess, x, y, optimizer, np.arange(mpi.rank() * per_rank, (mpi.rank() + 1) * per_rank))
    w, b = sess.run(params)
    np.savez(os.path.join(out_dir, f"rank{mpi.rank()}.npz"), w=w, b=b)
    print("DONE", mpi.rank(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
