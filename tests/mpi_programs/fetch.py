"""Every rank calls files.local_path(URL) (collective); print each rank's path or error."""
import json
import sys

from lm_human_preferences.utils import files, mpi

url = sys.argv[1]
try:
    path = files.local_path(url)
    with open(path) as f:
        report = {"path": path, "text": f.read()}
except files.FileFetchError as e:
    report = {"error": str(e), "type": type(e).__name__, "status": e.status, "cache_path": e.cache_path}
print("RESULT", mpi.rank(), json.dumps(report), flush=True)
