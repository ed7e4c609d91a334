"""What both trainers share: the run's seed and session, a checkpoint of the whole training state, resuming
exactly, and a clean stop on SIGTERM / SIGINT / SIGUSR1.

A long run (hours, on machines that may be preempted) must be able to stop and continue as if it never had:

* **Randomness is a function of the position in the run.** Sampling uses a stateless seed and shuffling a
  numpy generator, both derived from (run seed, rank, purpose, step) by `stateless_seed` / `numpy_rng`, so a
  resumed run draws exactly what the uninterrupted run drew at the same step.
* **`TrainingState`** checkpoints the model parameters, the optimizer's state (Adam's slots and step) and the
  run's counters (step, kl_coef, seed, stage) into SAVE_DIR/resume/KIND/ — the latest only; the model
  checkpoints of the 2019 layout (policy/, reward_model/) are written beside it as before.
* **`StopSignals`** turns SIGTERM (schedulers, preempted VMs), SIGINT (Ctrl-C) and SIGUSR1 (what `mpiexec`
  forwards to every rank) into a request to stop at the next step boundary; the ranks agree on that
  boundary with one tiny all-reduce per step. The trainer then saves, says how to resume and raises
  `RunInterrupted`, which the launcher turns into the exit status INTERRUPTED_EXIT_CODE. A second Ctrl-C
  stops at once (KeyboardInterrupt).
"""

import contextlib
import os
import signal
import threading
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences.utils import devices, files, mpi, stats

# EX_TEMPFAIL ("temporary failure, try again"): the run saved its state and can be resumed; schedulers can
# requeue on it. A run killed without the chance to save exits otherwise (e.g. 137 for SIGKILL).
INTERRUPTED_EXIT_CODE = 75
RESUME_DIR = "resume"  # SAVE_DIR/resume/{ppo,reward_model}/: the full training state of the latest save
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunInterrupted(Exception):
    """A stop was requested (a signal); the state was saved. Raised on every rank at the same step."""


# ----- seeds ------------------------------------------------------------------------------------------------------

def run_seed(seed: Optional[int]) -> int:
    """The seed everything of a run derives from: run.seed, or (None) one drawn on rank 0 and shared."""
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0]) if mpi.is_root() else None
        seed = mpi.broadcast(seed)
    return int(seed)


def _entropy(seed: int, *parts: int):
    return np.random.SeedSequence([int(seed) % 2 ** 63, *[int(p) for p in parts]])


def stateless_seed(seed: int, *parts: int) -> np.ndarray:
    """An int64 [2] seed for TensorFlow's stateless random ops, a function of (seed, *parts) alone."""
    return _entropy(seed, *parts).generate_state(2, dtype=np.uint32).astype(np.int64)


def numpy_rng(seed: int, *parts: int) -> np.random.Generator:
    """A numpy generator that is a function of (seed, *parts) alone."""
    return np.random.default_rng(_entropy(seed, *parts))


def publish(local_dir: str, save_dir: str):
    """After a save: rank 0 uploads what changed in the run's local directory when SAVE_DIR is gs:// (a no-op for a
    local SAVE_DIR); see `files.sync_up`."""
    if mpi.is_root():
        files.sync_up(local_dir, save_dir)


def new_session(run_hparams, variables_to_share: Sequence) -> tf.Session:
    """The run's session (XLA and TF32 switches), every variable initialised, and rank 0's values of
    `variables_to_share` on every rank."""
    sess = devices.new_session(xla=run_hparams.xla, tf32=run_hparams.tf32)
    sess.run(tf.global_variables_initializer())
    mpi.broadcast_variables(sess, list(variables_to_share))
    return sess


@contextlib.contextmanager
def quiet_tensorflow_warnings():
    """TensorFlow's Saver warns that its own way of deleting old checkpoints (max_to_keep) is deprecated, once
    per process, in the middle of a run's log: say nothing below errors while saving."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


# ----- the training state -------------------------------------------------------------------------------------------

class TrainingState:
    """A checkpoint of everything a run needs to continue: `variables` (parameters, optimizer state) and named
    counters, kept in LOCAL_RUN_DIR/resume/KIND/ (the latest save only). Build it in the trainer's graph."""

    def __init__(self, kind: str, variables: Sequence, counters: Dict[str, tf.DType]):
        self.kind = kind
        with tf.variable_scope(f"run_state_{kind}"):
            self.counters = {name: tf.get_variable(name, shape=(), dtype=dtype, trainable=False,
                                                   initializer=tf.zeros_initializer())
                             for name, dtype in counters.items()}
            self._new_values = {name: tf.placeholder(dtype, (), name=f"new_{name}") for name, dtype in counters.items()}
            self._assign = tf.group(*[self.counters[n].assign(self._new_values[n]) for n in counters])
        self.saver = tf.train.Saver(list(variables) + list(self.counters.values()), max_to_keep=1,
                                    save_relative_paths=True)

    def directory(self, local_dir: str) -> str:
        return f"{local_dir}/{RESUME_DIR}/{self.kind}"

    def save(self, sess, local_dir: str, checkpoint_step: int, **counters):
        """Rank 0 writes the state as state.ckpt-CHECKPOINT_STEP (TensorFlow updates its `checkpoint` file last,
        atomically); `counters` gives every counter's value."""
        if mpi.is_root():
            sess.run(self._assign, {self._new_values[name]: value for name, value in counters.items()})
            os.makedirs(self.directory(local_dir), exist_ok=True)
            with quiet_tensorflow_warnings():
                self.saver.save(sess, f"{self.directory(local_dir)}/state.ckpt", global_step=checkpoint_step,
                                write_meta_graph=False)

    def restore(self, sess, local_dir: str) -> Optional[Dict[str, float]]:
        """Load the saved state on every rank (each machine holds the run); its counters, or None if none."""
        path = tf.train.latest_checkpoint(self.directory(local_dir))
        if path is None:
            return None
        self.saver.restore(sess, path)
        return {name: value.item() for name, value in sess.run(self.counters).items()}


# ----- stopping -------------------------------------------------------------------------------------------------------

class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.agreed(): save and raise RunInterrupted`. Nested uses (the
    reward-model stage inside train_policy) share one request, so a signal is never lost between stages."""

    _received: Optional[int] = None  # the first stop signal of this process, shared by every use
    _depth = 0
    _previous: Dict[int, object] = {}

    def __enter__(self):
        cls = StopSignals
        if cls._depth == 0:
            cls._received = None
            if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
                cls._previous = {signum: signal.signal(signum, cls._handle) for signum in STOP_SIGNALS}
        cls._depth += 1
        return self

    def __exit__(self, *exc_info):
        cls = StopSignals
        cls._depth -= 1
        if cls._depth == 0:
            for signum, handler in cls._previous.items():
                signal.signal(signum, handler)
            cls._previous = {}

    @staticmethod
    def _handle(signum, frame):
        cls = StopSignals
        if cls._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        if cls._received is None:
            cls._received = signum
            stats.log(f"received {signal.Signals(signum).name}: stopping after the current step to save the run "
                      f"(Ctrl-C again stops at once without saving)")

    @property
    def received(self) -> Optional[int]:
        return StopSignals._received

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a stop signal."""
        return bool(mpi.allreduce_mean(np.array([0.0 if self.received is None else 1.0]))[0] > 0)


def stop_message(what: str, step_name: str, step: int, total: int, save_dir: str) -> str:
    return (f"interrupted: {what} stopped after {step_name} {step} of {total}; its state is saved in "
            f"{files.join(save_dir, RESUME_DIR)}. Continue it with the same command and --resume.")
