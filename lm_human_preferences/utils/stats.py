"""Statistics logging, in one place: averaging over MPI ranks, TensorBoard event files and a compact console
line (rank 0), timing the parts of a step, and reading event files back (the demo's plot, tests) without
TensorBoard.

    logger = StatsLogger(os.path.join(save_dir, "tb"))
    averaged = logger.record(step, stats)   # collective: every rank calls it; rank 0 writes
    stats.log(compact_line(step, averaged, ["objective/score", "objective/kl"]))   # rank 0's console line
    ...
    logger.close()

Both trainers average with `mean_over_ranks` (through `record`, or first, where a trainer needs the means
itself: PPO's KL controller) and write with `StatsLogger.write`; statistics of examples spread unevenly over
the ranks are pooled with `mean_over_examples`.

TensorFlow and MPI are imported only when needed: a single process never touches MPI.
"""

import contextlib
import glob
import os
import struct
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple


def _is_root() -> bool:
    from lm_human_preferences.utils import mpi
    return mpi.is_root()


def mean_over_ranks(stats: Dict[str, float]) -> Dict[str, float]:
    """Each statistic averaged over MPI ranks (collective: every rank passes the same keys). One rank: floats."""
    from lm_human_preferences.utils import mpi
    return mpi.mean_dict(stats)


def mean_over_examples(sums: Dict[str, float], count: int) -> Dict[str, float]:
    """Means over the examples of all ranks, from this rank's `sums` of each statistic over its `count` examples
    (collective: every rank passes the same keys; the ranks may hold different numbers of examples)."""
    import numpy as np
    from lm_human_preferences.utils import mpi
    keys = sorted(sums)
    totals = mpi.allreduce_mean(np.array([count] + [sums[key] for key in keys], np.float64))
    return {key: totals[i + 1] / max(totals[0], 1e-12) for i, key in enumerate(keys)}


def mean_and_std_over_ranks(values) -> Tuple[float, float]:
    """Mean and std of a 1-D sample of which each rank holds a part (collective)."""
    import numpy as np
    values = np.asarray(values, np.float64)
    means = mean_over_examples({"value": values.sum(), "square": np.square(values).sum()}, values.size)
    mean = means["value"]
    return float(mean), float(np.sqrt(max(means["square"] - mean ** 2, 0.0)))


def compact_line(step, stats: Dict[str, float], keys: Sequence[str], *, step_name: str = "step") -> str:
    """One console line: `step 12 | objective/score 0.1234 | objective/kl 1.5`. Keys not in `stats` are
    skipped (e.g. a judge's score exists only in the demo); numbers keep 4 significant digits."""
    parts = [f"{step_name} {step}"] + [f"{key} {stats[key]:.4g}" for key in keys if key in stats]
    return " | ".join(parts)


class StatsLogger:
    """Scalars to `logdir` as TensorBoard events (Summary protos, no graph ops). Only an enabled logger (by
    default: on rank 0) writes."""

    def __init__(self, logdir: str, *, enabled: Optional[bool] = None, restart_at: Optional[int] = None):
        """restart_at: a resumed run continues from this step; what an earlier run logged from it on is void
        (a SessionLog START event: TensorBoard, and `read_scalars`, drop those values, so nothing is duplicated)."""
        self.logdir = logdir
        self.enabled = _is_root() if enabled is None else enabled
        self.writer = None
        if self.enabled:
            import tensorflow.compat.v1 as tf
            self._tf = tf
            # FileWriter refuses eager mode; built under a throwaway graph it works in either mode and
            # adds nothing to the caller's graph (we write protos, not summary ops).
            with tf.Graph().as_default():
                self.writer = tf.summary.FileWriter(logdir)
            if restart_at is not None:
                self.writer.add_session_log(tf.SessionLog(status=tf.SessionLog.START), global_step=restart_at)
                self.writer.flush()

    def write(self, step: int, scalars: Dict[str, float]):
        """Write statistics already averaged over ranks (no collective); a no-op when disabled."""
        if self.writer is None:
            return
        tf = self._tf
        summary = tf.Summary(value=[tf.Summary.Value(tag=tag, simple_value=float(value))
                                    for tag, value in sorted(scalars.items())])
        self.writer.add_summary(summary, global_step=step)
        self.writer.flush()  # the run may be killed at any time; what was logged should be on disk

    def record(self, step: int, stats: Dict[str, float]) -> Dict[str, float]:
        """Average `stats` over ranks (collective: every rank must call, enabled or not) and write them; return
        the averaged statistics."""
        averaged = mean_over_ranks(stats)
        self.write(step, averaged)
        return averaged

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _tfrecords(path: str):
    """The payloads of a TFRecord file (TF's own reader is deprecated and warns on every use). A record still
    being written at the end of the file is skipped; checksums are not verified."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)  # uint64 length, uint32 masked CRC of the length
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            f.read(4)  # masked CRC of the payload
            if len(payload) < length:
                return
            yield payload


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
    """{tag: [(step, value), ...] in step order} from every event file under `logdir` (recursively). As in
    TensorBoard, a SessionLog START at step s (a resumed run) drops the values logged earlier at steps >= s in
    the same directory."""
    from tensorflow.core.util import event_pb2
    found = defaultdict(list)  # directory -> [(wall time, path)]
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        found[os.path.dirname(path)].append(path)
    scalars = defaultdict(list)
    for directory, paths in found.items():
        in_directory = defaultdict(list)
        for path in sorted(paths, key=lambda p: (_file_wall_time(p), p)):  # the order the runs wrote them
            for record in _tfrecords(path):
                event = event_pb2.Event.FromString(record)
                if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                    for tag in in_directory:
                        in_directory[tag] = [(step, v) for step, v in in_directory[tag] if step < event.step]
                for value in event.summary.value:
                    in_directory[value.tag].append((event.step, value.simple_value))
        for tag, values in in_directory.items():
            scalars[tag].extend(values)
    return {tag: sorted(values) for tag, values in scalars.items()}


def _file_wall_time(path: str) -> float:
    """When an event file was started: the wall time of its first event (its file-version record)."""
    from tensorflow.core.util import event_pb2
    for record in _tfrecords(path):
        return event_pb2.Event.FromString(record).wall_time
    return 0.0


# ----- console ---------------------------------------------------------------------------------------------------

class Timer:
    """Seconds taken by the named parts of a step: `with timer("rollout"): ...`, then `timer.seconds`."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.time()
        yield
        self.seconds[name] = time.time() - start


def progress_bar(iterable, desc: str, *, initial: int = 0, total: Optional[int] = None):
    """A tqdm bar on rank 0 when stderr is a terminal; none in logs (the per-step lines say it all there).
    A resumed run starts its bar at `initial` of `total`."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=not (_is_root() and sys.stderr.isatty()), dynamic_ncols=True,
                initial=initial, total=total)


def duration(seconds: float) -> str:
    """4s, 3m07s, 2h05m: a time left, readable at a glance."""
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def log(message: str):
    """Print on rank 0 without breaking a progress bar."""
    if _is_root():
        from tqdm import tqdm
        tqdm.write(message)
