"""Which device a process computes on, and how its TensorFlow session is configured.

One MPI rank per GPU: rank `local_rank` on a machine sees only GPU `local_rank`, so
`--mpi 8` on an 8-GPU box spreads the ranks over the GPUs; with fewer GPUs than ranks they share round-robin,
and with none everything runs on the CPU. `xla` switches on TensorFlow's XLA auto-clustering (JIT), one of
the speed switches measured by bench.py.

On a CPU, auto-clustering compiles nothing unless TF_XLA_FLAGS holds `--tf_xla_cpu_global_jit`, and TensorFlow
reads that once per process, when it first lists its devices (a later change is ignored). So `import_tensorflow`,
which every entry point calls before anything else touches TensorFlow, sets it on a machine without an NVIDIA
GPU: `--run.xla on` then compiles on a CPU too. Without XLA switched on it changes nothing. A session asked for
XLA on a CPU in a process that did not set it says once that XLA compiles nothing there, and what to set.

`import_tensorflow` also switches on TensorFlow's oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS=1) unless the
environment already sets that variable. TensorFlow enables them by itself only on CPUs with AVX-512 VNNI, BF16 or
AMX; elsewhere (an AVX2 CPU such as the 2-core development machine) it falls back to its Eigen kernels and to an
allocator that maps every large tensor afresh from the system (a page fault per 4 KB on each use). With oneDNN,
whose allocator keeps and reuses its memory, a GPT-2 124M PPO update at batch 8 took 16.4-18.9 s against
22.1-27.2 s on that machine (bench.py, the two settings alternated). oneDNN sums in other orders than Eigen, so
results differ in float32 round-off only. `TF_ENABLE_ONEDNN_OPTS=0` in the environment keeps Eigen.

Float32 means true float32: TensorFlow computes float32 matrix products in TF32 (10-bit mantissa) on
Ampere and newer GPUs unless told otherwise, and the 2019 runs had no TF32. Every session made here sets
TF32 explicitly, off unless `tf32=True` (`--run.tf32`), so results do not depend on the GPU generation.
"""

import contextlib
import functools
import os
import re
import sys
import tempfile

from lm_human_preferences.utils import mpi

# What TensorFlow's C++ side writes to stderr while it loads, whatever TF_CPP_MIN_LOG_LEVEL says (absl logs
# before its logging is initialised): information lines in glog's format (I0000 00:00:... port.cc:153] oneDNN
# custom operations are on / Could not find cuda drivers), absl's warning about that, the CPU-feature notice,
# and the CUDA plug-ins registering twice. A user gains nothing from them; warnings and errors are kept.
_STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ \S+:\d+\] .*"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow .*"
    r"|[EW]\d{4} [\d:.]+ +\d+ \S+:\d+\] Unable to register cu(DNN|FFT|BLAS) factory.*")
# On a machine without an NVIDIA GPU, a TensorFlow built with CUDA reports its failure to find one as an error.
_NO_GPU_NOISE = re.compile(r"[EW]\d{4} [\d:.]+ +\d+ \S+:\d+\] failed call to cuInit: .*")

# What lets XLA auto-clustering compile CPU ops (see the module docstring).
CPU_XLA_FLAG = "--tf_xla_cpu_global_jit"
# What switches TensorFlow's oneDNN CPU kernels and allocator on (1) or off (0) (see the module docstring).
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or any(name.startswith("nvidia") for name in _dev_names())


def _dev_names():
    try:
        return os.listdir("/dev")
    except OSError:
        return []


@contextlib.contextmanager
def tensorflow_startup_quiet():
    """Inside, file descriptor 2 (where TensorFlow's C++ logs go) is held in a temporary file; at the end its
    lines go to stderr, less TensorFlow's start-up notices (and, without an NVIDIA device, its cuInit failure).
    An exception inside still shows everything it wrote."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            no_gpu = not has_nvidia_device()
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not _STARTUP_NOISE.fullmatch(line.rstrip("\n"))
                    and not (no_gpu and _NO_GPU_NOISE.fullmatch(line.rstrip("\n")))]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def allow_xla_on_cpu():
    """On a machine without an NVIDIA GPU, add CPU_XLA_FLAG to TF_XLA_FLAGS (this process's and the ones it starts),
    unless the user's TF_XLA_FLAGS already says `--tf_xla_cpu_global_jit=...`. Effective only before TensorFlow first
    lists its devices."""
    if has_nvidia_device():
        return
    flags = os.environ.get("TF_XLA_FLAGS", "").split()
    if not any(flag == CPU_XLA_FLAG or flag.startswith(CPU_XLA_FLAG + "=") for flag in flags):
        os.environ["TF_XLA_FLAGS"] = " ".join(flags + [CPU_XLA_FLAG])


def use_onednn():
    """Ask for TensorFlow's oneDNN CPU kernels in this process and the ones it starts, unless the environment already
    says ONEDNN_VARIABLE (a user's 0 is kept). Effective only before TensorFlow is imported."""
    os.environ.setdefault(ONEDNN_VARIABLE, "1")


def cpu_xla_enabled() -> bool:
    """Whether TF_XLA_FLAGS lets auto-clustering compile CPU ops (`--tf_xla_cpu_global_jit`, or `=true`/`=1`)."""
    for flag in os.environ.get("TF_XLA_FLAGS", "").split():
        name, equals, value = flag.partition("=")
        if name == CPU_XLA_FLAG:
            return not equals or value.lower() in ("true", "1")
    return False


def import_tensorflow():
    """`import tensorflow` without its start-up notices, XLA allowed to compile on a CPU (allow_xla_on_cpu) and its
    oneDNN CPU kernels on (use_onednn); the entry points call it before anything imports TensorFlow (a later import
    finds the module loaded and prints nothing)."""
    allow_xla_on_cpu()  # before gpu_count(): listing the devices fixes TensorFlow's XLA flags for the process
    use_onednn()  # before the import: TensorFlow reads it when it loads
    with tensorflow_startup_quiet():
        import tensorflow as tf
        gpu_count()  # finding the devices is the other noisy step (cuInit)
    return tf


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
        if not gpu_count() and not cpu_xla_enabled():
            _say_once(f"run.xla: XLA compiles nothing on a CPU unless TF_XLA_FLAGS={CPU_XLA_FLAG} is set before "
                      f"TensorFlow first lists its devices; this process runs without it (./launch.py, sample.py and "
                      f"bench.py set it themselves): set TF_XLA_FLAGS={CPU_XLA_FLAG} in the environment, or call "
                      f"lm_human_preferences.utils.devices.import_tensorflow() before anything else uses TensorFlow")
    return config


_said = set()


def _say_once(message: str):
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr, flush=True)


def set_tf32(enabled: bool):
    """TF32 for float32 matrix products on GPUs that have it (a process-wide TensorFlow setting)."""
    import tensorflow as tf
    tf.config.experimental.enable_tensor_float_32_execution(bool(enabled))


def new_session(*, xla: bool = False, tf32: bool = False):
    import tensorflow.compat.v1 as tf
    set_tf32(tf32)
    return tf.Session(config=session_config(xla=xla))
