"""Adam with gradient accumulation over micro-batches and gradient averaging across MPI ranks.

The optimizer is TensorFlow 1's Adam (`tf.compat.v1.train.AdamOptimizer`) on purpose: its epsilon sits
outside the bias correction (lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); p -= lr_t * m / (sqrt(v) + eps)), and
PyTorch-style Adam gave about 6x larger early policy updates on this task. Do not swap it.

Gradient accumulation: a minibatch that does not fit in memory is split into `micro_batches` equal
micro-batches. The caller runs `accumulate_op` once per micro-batch (feeding that micro-batch), then
`apply_op` once; the applied gradient is the mean of the micro-batch gradients, which for a loss that is a
mean over examples equals the gradient of the whole minibatch. :meth:`Optimizer.step` does exactly that (both
trainers take their steps with it).

With micro_batches=1 there are no accumulator variables: `accumulate_op` computes the gradient, averages it
across ranks and applies it in one run, and `apply_op` does nothing. The calling protocol stays the same and
no memory is spent on a copy of the gradients.

Across ranks the gradients are flattened into one buffer and averaged with one all-reduce per update:
horovod's in the graph when it is installed (`make horovod`), else `mpi.allreduce_mean` through
`tf.numpy_function`; LMHP_ALLREDUCE=horovod|mpi4py forces one (see `mpi.horovod_tensorflow`).

All variables created here (accumulators, Adam's slots and beta powers) live under the
optimizer's own variable scope (default `optimizer`); `Optimizer.variables` lists them. They are not model
parameters: checkpoint loading maps model parameters only and ignores them.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences.utils import mpi


def _dense(gradient):
    """Embedding lookups give IndexedSlices; accumulation and the flat all-reduce need dense tensors."""
    return tf.convert_to_tensor(gradient) if isinstance(gradient, tf.IndexedSlices) else gradient


def average_across_ranks(gradients: List[tf.Tensor]) -> List[tf.Tensor]:
    """Mean of each gradient over MPI ranks, with one all-reduce of a flat float32 buffer."""
    if mpi.size() == 1:
        return gradients
    shapes = [g.shape.as_list() for g in gradients]
    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients], axis=0)  # [sum(sizes)]
    hvd = mpi.horovod_tensorflow()
    mpi.allreduce_name()  # rank 0 says once which all-reduce the job uses
    if hvd is not None:
        averaged = hvd.allreduce(flat, op=hvd.Average)
    else:
        # stateful: the op must run exactly once per step on every rank (never folded or pruned).
        averaged = tf.numpy_function(mpi.allreduce_mean, [flat], tf.float32, stateful=True, name="allreduce_mean")
    averaged.set_shape(flat.shape)
    pieces = tf.split(averaged, sizes, axis=0)
    return [tf.cast(tf.reshape(piece, shape), g.dtype) for piece, shape, g in zip(pieces, shapes, gradients)]


class Optimizer:
    """TF1 Adam on `loss` w.r.t. `params`, with `micro_batches`-step accumulation and cross-rank averaging.

    loss: scalar tensor, a MEAN over the examples of one micro-batch (so that averaging micro-batch
        gradients gives the minibatch gradient).
    params: the trainable variables to update (all must have fully defined shapes).
    lr: float or scalar tensor (e.g. a placeholder fed with the annealed learning rate).
    micro_batches: a positive integer (ppo.micro_batches, checked with the hyperparameters).
    """

    def __init__(self, loss, params: Sequence[tf.Variable], lr, *, epsilon: float = 1e-5, micro_batches: int = 1,
                 scope: Optional[str] = None):
        self.micro_batches = micro_batches
        params = list(params)
        gradients = tf.gradients(loss, params)
        pairs = [(_dense(g), p) for g, p in zip(gradients, params) if g is not None]
        if not pairs:
            raise ValueError(f"loss {loss.name} does not depend on any of the {len(params)} parameters given")
        self.params = [p for _, p in pairs]  # parameters the loss depends on (the others are not updated)
        gradients = [g for g, _ in pairs]

        with tf.variable_scope(scope, default_name="optimizer") as var_scope:
            self.scope = var_scope.name
            self._adam = tf.train.AdamOptimizer(lr, epsilon=epsilon)
            if micro_batches == 1:
                self.accumulate_op = self._apply(gradients)
                self.apply_op = tf.no_op(name="apply_noop")
            else:
                accumulators = [tf.get_variable(f"accumulators/{p.op.name}", p.shape, p.dtype.base_dtype,
                                                tf.zeros_initializer(), trainable=False) for p in self.params]
                self.accumulate_op = tf.group(*[acc.assign_add(g / micro_batches)
                                                for acc, g in zip(accumulators, gradients)], name="accumulate")
                apply = self._apply([acc.read_value() for acc in accumulators])
                with tf.control_dependencies([apply]):
                    self.apply_op = tf.group(*[acc.assign(tf.zeros_like(acc)) for acc in accumulators],
                                             name="apply_and_reset")
        self.variables = [v for v in tf.global_variables() if v.name.startswith(self.scope + "/")]

    def _apply(self, gradients):
        return self._adam.apply_gradients(list(zip(average_across_ranks(gradients), self.params)))

    def step(self, sess, feed_dicts: Sequence[Dict], fetches=None, shared_feed: Optional[Dict] = None) -> List:
        """One update: `accumulate_op` once per micro-batch feed, then `apply_op`; `shared_feed` (e.g. the
        learning rate) is fed to each of these runs.

        Returns the values of `fetches` for each micro-batch (fetched in the same run as its accumulation).
        Under MPI every rank must call it (the apply is a collective).
        """
        if len(feed_dicts) != self.micro_batches:
            raise ValueError(f"Optimizer.step got {len(feed_dicts)} micro-batch feeds, built for "
                             f"micro_batches={self.micro_batches}")
        shared_feed = shared_feed or {}
        results = [sess.run([fetches if fetches is not None else [], self.accumulate_op],
                            feed_dict={**feed, **shared_feed})[0] for feed in feed_dicts]
        sess.run(self.apply_op, feed_dict=shared_feed)
        return results
