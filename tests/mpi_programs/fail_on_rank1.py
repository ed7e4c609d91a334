"""Rank 1 raises while rank 0 waits in a collective: the whole job must end with rank 1's error."""
from lm_human_preferences.utils import mpi

mpi.install_abort_on_error()
if mpi.rank() == 1:
    raise ValueError("deliberate failure on rank 1")
mpi.barrier()  # rank 0 would wait here forever without the abort
print("rank 0 got past the barrier", flush=True)
