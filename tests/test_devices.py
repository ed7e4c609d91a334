"""Session set-up: true float32 by default (no TF32), as the 2019 runs had; run.xla really compiles on a CPU."""

import os
import subprocess
import sys

import pytest
import tensorflow as tf

from lm_human_preferences.utils import devices

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sessions_run_true_float32_unless_tf32_is_asked_for():
    # TensorFlow enables TF32 by default (it matters on Ampere and newer GPUs); every session we make decides
    tf.config.experimental.enable_tensor_float_32_execution(True)
    with devices.new_session():
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    with devices.new_session(tf32=True):
        assert tf.config.experimental.tensor_float_32_execution_enabled()
    devices.set_tf32(False)


# ----- run.xla on a CPU: TensorFlow compiles CPU ops only with TF_XLA_FLAGS=--tf_xla_cpu_global_jit ---------------

# A subprocess (the flag is read once per process): builds a small graph and reports, for each session it runs, the
# XLA ops TensorFlow put into the graph it executed (_XlaCompile/_XlaRun when a cluster was compiled).
XLA_PROBE = """
import sys
from lm_human_preferences.utils import devices
if sys.argv[1] == "entry_point":
    tf = devices.import_tensorflow()
else:  # a script that imports TensorFlow itself and lists its devices first
    import tensorflow as tf
    tf.config.list_physical_devices("GPU")
tf.compat.v1.disable_eager_execution()
v1 = tf.compat.v1
x = v1.random.normal([16, 32], seed=1)
w = v1.Variable(v1.random.normal([32, 32], seed=2))
y = x
for _ in range(3):
    y = tf.nn.relu(tf.matmul(y, w)) * 0.5 + 0.1
total = tf.reduce_sum(y)
for xla in (False, True, True):
    with v1.Session(config=devices.session_config(xla=xla)) as sess:
        sess.run(v1.global_variables_initializer())
        metadata = v1.RunMetadata()
        sess.run(total, options=v1.RunOptions(output_partition_graphs=True), run_metadata=metadata)
        ops = sorted({node.op for graph in metadata.partition_graphs for node in graph.node if "Xla" in node.op})
        print(f"xla={xla}: {','.join(ops) or 'none'}", flush=True)
"""


def run_probe(script, *args, unset, **env_changes):
    """Run a probe script in a fresh Python with environment variable `unset` removed and `env_changes` added."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(unset, None)
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)


def run_xla_probe(how, **env_changes):
    return run_probe(XLA_PROBE, how, unset="TF_XLA_FLAGS", **env_changes)


@pytest.mark.skipif(devices.has_nvidia_device(), reason="the CPU rule; on a GPU machine XLA clusters GPU ops")
def test_run_xla_compiles_on_a_cpu_when_tensorflow_is_imported_as_the_entry_points_do():
    result = run_xla_probe("entry_point")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["xla=False: none"] + ["xla=True: _XlaCompile,_XlaMerge,_XlaRun"] * 2
    assert "run.xla" not in result.stderr


@pytest.mark.skipif(devices.has_nvidia_device(), reason="the CPU rule; on a GPU machine XLA clusters GPU ops")
def test_run_xla_without_the_cpu_flag_says_once_that_it_compiles_nothing():
    result = run_xla_probe("own_import")  # TensorFlow listed its devices before anyone set TF_XLA_FLAGS
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["xla=False: none", "xla=True: none", "xla=True: none"]
    notes = [line for line in result.stderr.splitlines() if line.startswith("run.xla:")]
    assert len(notes) == 1, result.stderr
    assert "XLA compiles nothing on a CPU unless TF_XLA_FLAGS=--tf_xla_cpu_global_jit is set" in notes[0]
    # set in the environment, as the note says, the same script compiles, and says nothing
    fixed = run_xla_probe("own_import", TF_XLA_FLAGS="--tf_xla_cpu_global_jit")
    assert fixed.stdout.splitlines() == ["xla=False: none"] + ["xla=True: _XlaCompile,_XlaMerge,_XlaRun"] * 2
    assert "run.xla" not in fixed.stderr


def test_the_cpu_xla_flag_is_added_once_and_a_users_own_setting_is_kept(monkeypatch):
    monkeypatch.setattr(devices, "has_nvidia_device", lambda: False)
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2")
    devices.allow_xla_on_cpu()
    devices.allow_xla_on_cpu()
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit" and devices.cpu_xla_enabled()
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_cpu_global_jit=false")
    devices.allow_xla_on_cpu()
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_cpu_global_jit=false" and not devices.cpu_xla_enabled()
    monkeypatch.delenv("TF_XLA_FLAGS")
    monkeypatch.setattr(devices, "has_nvidia_device", lambda: True)  # a GPU machine: XLA clusters the GPU's ops
    devices.allow_xla_on_cpu()
    assert "TF_XLA_FLAGS" not in os.environ


@pytest.mark.skipif(devices.has_nvidia_device(), reason="the CPU rule; on a GPU machine XLA clusters GPU ops")
def test_launch_py_with_run_xla_on_compiles_on_a_cpu(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")  # TensorFlow's information line when it compiles a cluster
    env.pop("TF_XLA_FLAGS", None)
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "launch.py"), "train_reward", "test", "x",
                             "--save_dir", str(tmp_path), "--run.xla", "on"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Compiled cluster using XLA" in result.stderr
    assert "run.xla:" not in result.stderr


# ----- oneDNN on a CPU: TensorFlow switches it on by itself only on CPUs with AVX-512 VNNI, BF16 or AMX ---------------

# A subprocess (TensorFlow reads TF_ENABLE_ONEDNN_OPTS when it loads): imports TensorFlow as the entry points do, then
# reports the page faults of one run of a 64 MB product, after a warm-up run. Without oneDNN's allocator every such
# tensor is mapped afresh from the system: a fault per 4 KB page (16,385 measured), or at least one per 2 MB where the
# kernel maps transparent huge pages by default (32); with it the memory is reused (0 measured).
ONEDNN_PROBE = """
import resource
from lm_human_preferences.utils import devices
tf = devices.import_tensorflow()
v1 = tf.compat.v1
v1.disable_eager_execution()
x = v1.get_variable("x", [16 * 1024 * 1024], initializer=v1.ones_initializer())
scale = v1.get_variable("scale", [], initializer=v1.ones_initializer())
product = tf.convert_to_tensor(x) * scale
with v1.Session() as sess:
    sess.run(v1.global_variables_initializer())
    sess.run(product.op)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sess.run(product.op)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_a_64_mb_product(**env_changes):
    result = run_probe(ONEDNN_PROBE, unset=devices.ONEDNN_VARIABLE, **env_changes)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def test_the_entry_points_tensorflow_reuses_its_memory_with_onednn_and_a_users_zero_is_kept():
    huge_pages_in_64_mb = 32
    assert page_faults_of_a_64_mb_product() < huge_pages_in_64_mb  # memory reused
    assert page_faults_of_a_64_mb_product(TF_ENABLE_ONEDNN_OPTS="0") >= huge_pages_in_64_mb  # Eigen's: mapped afresh


def test_use_onednn_sets_the_variable_only_where_the_environment_does_not(monkeypatch):
    monkeypatch.delenv(devices.ONEDNN_VARIABLE, raising=False)
    devices.use_onednn()
    assert os.environ[devices.ONEDNN_VARIABLE] == "1"
    monkeypatch.setenv(devices.ONEDNN_VARIABLE, "0")
    devices.use_onednn()
    assert os.environ[devices.ONEDNN_VARIABLE] == "0"
