"""Shared test setup: quiet TensorFlow, TF1 graph mode, a fresh graph per test."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.compat.v1.disable_eager_execution()


@pytest.fixture(autouse=True)
def fresh_graph():
    """Each test builds into its own default graph, so variable names never collide across tests."""
    graph = tf.Graph()
    with graph.as_default():
        yield graph
