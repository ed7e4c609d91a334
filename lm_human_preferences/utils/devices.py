"""Which device a process computes on, and how its TensorFlow session is configured.

One MPI rank per GPU: rank `local_rank` on a machine sees only GPU `local_rank`, so
`--mpi 8` on an 8-GPU box spreads the ranks over the GPUs; with fewer GPUs than ranks they share round-robin,
and with none everything runs on the CPU. `xla` switches on TensorFlow's XLA auto-clustering (JIT), one of
the speed switches measured by bench.py.

Float32 means true float32: TensorFlow computes float32 matrix products in TF32 (10-bit mantissa) on
Ampere and newer GPUs unless told otherwise, and the 2019 runs had no TF32. Every session made here sets
TF32 explicitly, off unless `tf32=True` (`--run.tf32`), so results do not depend on the GPU generation.
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


def set_tf32(enabled: bool):
    """TF32 for float32 matrix products on GPUs that have it (a process-wide TensorFlow setting)."""
    import tensorflow as tf
    tf.config.experimental.enable_tensor_float_32_execution(bool(enabled))


def new_session(*, xla: bool = False, tf32: bool = False):
    import tensorflow.compat.v1 as tf
    set_tf32(tf32)
    return tf.Session(config=session_config(xla=xla))
