"""Two ranks: all-reduce a buffer, broadcast a python object, average stats; print what each rank got."""
import json

import numpy as np

from lm_human_preferences.utils import mpi

rank = mpi.rank()
mean = mpi.allreduce_mean(np.array([1.0, 2.0, 3.0], np.float32) * (rank + 1))
obj = mpi.broadcast({"from": rank, "items": [rank] * 3} if rank == 0 else None)
stats = mpi.mean_dict({"loss": float(rank), "score": 10.0 * rank})
report = {"size": mpi.size(), "local_rank": mpi.local_rank(), "is_root": mpi.is_root(),
          "seed": mpi.rank_seed(1), "mean": mean.tolist(), "mean_dtype": str(mean.dtype), "obj": obj,
          "stats": stats}
mpi.barrier()
print("RESULT", rank, json.dumps(report), flush=True)
