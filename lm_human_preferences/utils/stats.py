"""Statistics logging, in one place: TensorBoard event files (rank 0) and reading them back.

Trainers average their statistics over MPI ranks first (`mpi.mean_dict`) and hand the result to
`StatsLogger.write`; only rank 0 writes. `read_scalars` reads a run's event files back (the demo's plot,
tests) without TensorBoard.
"""

import glob
import os
from collections import defaultdict
from typing import Dict, List, Tuple

from lm_human_preferences.utils import mpi


class StatsLogger:
    """Scalars to `logdir` as TensorBoard events (Summary protos, no graph ops); a no-op off rank 0."""

    def __init__(self, logdir: str, *, enabled: bool = None):
        self.enabled = mpi.is_root() if enabled is None else enabled
        self.writer = None
        if self.enabled:
            import tensorflow.compat.v1 as tf
            self.tf = tf
            self.writer = tf.summary.FileWriter(logdir)

    def write(self, step: int, scalars: Dict[str, float]):
        if self.writer is None:
            return
        summary = self.tf.Summary(value=[self.tf.Summary.Value(tag=tag, simple_value=float(value))
                                         for tag, value in sorted(scalars.items())])
        self.writer.add_summary(summary, global_step=step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
    """{tag: [(step, value), ...] in step order} from every event file under `logdir`."""
    import tensorflow.compat.v1 as tf
    scalars = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)):
        for event in tf.train.summary_iterator(path):
            for value in event.summary.value:
                scalars[value.tag].append((event.step, value.simple_value))
    return {tag: sorted(values) for tag, values in scalars.items()}


# ----- console ---------------------------------------------------------------------------------------------------

def progress_bar(iterable, desc: str):
    """A tqdm bar on rank 0 when stderr is a terminal; none in logs (the per-step lines say it all there)."""
    import sys
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=not (mpi.is_root() and sys.stderr.isatty()), dynamic_ncols=True)


def log(message: str):
    """Print on rank 0 without breaking a progress bar."""
    if mpi.is_root():
        from tqdm import tqdm
        tqdm.write(message)
