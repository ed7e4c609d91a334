"""Which device a process computes on, and how its TensorFlow session is configured.

One MPI rank per GPU (SPEC section 10): rank `local_rank` on a machine sees only GPU `local_rank`, so
`--mpi 8` on an 8-GPU box spreads the ranks over the GPUs; with fewer GPUs than ranks they share round-robin,
and with none everything runs on the CPU. `xla` switches on TensorFlow's XLA auto-clustering (JIT), one of
the speed switches measured by bench.py.
"""

import functools

from lm_human_preferences.utils import mpi


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    import tensorflow as tf
    return len(tf.config.list_physical_devices("GPU"))


def session_config(*, xla: bool = False):
    import tensorflow.compat.v1 as tf
    config = tf.ConfigProto()
    if gpu_count():
        config.gpu_options.visible_device_list = str(mpi.local_rank() % gpu_count())
        config.gpu_options.allow_growth = True  # several ranks may share a GPU on small machines
    if xla:
        config.graph_options.optimizer_options.global_jit_level = tf.OptimizerOptions.ON_1
    return config


def new_session(*, xla: bool = False):
    import tensorflow.compat.v1 as tf
    return tf.Session(config=session_config(xla=xla))
