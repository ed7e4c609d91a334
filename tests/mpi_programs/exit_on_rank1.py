"""Rank 1 calls sys.exit(3) inside launcher.abort_job_on_exit (as in launcher.run) while rank 0 waits in a
collective: the whole job must end, with rank 1's code reported, instead of hanging."""
import sys

from lm_human_preferences import launcher
from lm_human_preferences.utils import mpi

with launcher.abort_job_on_exit():
    if mpi.rank() == 1:
        sys.exit(3)
    mpi.barrier()  # rank 0 would wait here forever without the abort
    print("rank 0 got past the barrier", flush=True)
