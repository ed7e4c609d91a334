"""Session set-up: true float32 by default (no TF32), as the 2019 runs had."""

import tensorflow as tf

from lm_human_preferences.utils import devices


def test_sessions_run_true_float32_unless_tf32_is_asked_for():
    # TensorFlow enables TF32 by default (it matters on Ampere and newer GPUs); every session we make decides
    tf.config.experimental.enable_tensor_float_32_execution(True)
    with devices.new_session():
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    with devices.new_session(tf32=True):
        assert tf.config.experimental.tensor_float_32_execution_enabled()
    devices.set_tf32(False)
