"""Small programs that the MPI tests start under `mpiexec`, and the helper that starts them.

Each run has a timeout, so a deadlock fails the test instead of hanging the suite.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from lm_human_preferences.utils import mpi

PROGRAMS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(PROGRAMS))
TIMEOUT_SECONDS = 120


def run(n, program, *args, env=None, timeout=TIMEOUT_SECONDS):
    """Run tests/mpi_programs/`program` on `n` ranks; returns the CompletedProcess (stdout and stderr merged)."""
    full_env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    argv = mpi.mpiexec_command(n) + [sys.executable, os.path.join(PROGRAMS, program), *map(str, args)]
    try:
        result = subprocess.run(argv, env=full_env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"{program} on {n} ranks did not finish within {timeout}s (hang?); output:\n"
                             f"{output}") from None
    result.stdout = launcher_text(result.stdout)
    return result


def launcher_text(output: str) -> str:
    """What mpiexec printed, without the NUL byte Open MPI 5.0.11's launcher can end its MPI_ABORT notice with (see
    openpmix/prrte#1905): a rank's line forwarded right after that notice would start with "\0" (seen once in a
    suite run). Not ours; launch.py's own relay drops it too."""
    return output.replace("\0", "")


def rank_lines(output, tag):
    """{rank: rest of line} for the lines a program printed as `TAG RANK rest`."""
    found = {}
    for line in output.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0] == tag:
            found[int(parts[1])] = parts[2] if len(parts) > 2 else ""
    return found


def allreduce_env(name: str) -> dict:
    """The environment that forces the gradient all-reduce `name` (mpi4py or horovod) in the ranks.

    horovod's tests are skipped, saying why, where horovod is not built into the environment (`make horovod`);
    with LMHP_REQUIRE_HOROVOD=1 (CI sets it after building horovod) its absence fails them instead."""
    if name == "horovod" and importlib.util.find_spec("horovod") is None:
        message = "horovod is not built into this environment: run `make horovod`"
        if os.environ.get("LMHP_REQUIRE_HOROVOD"):
            pytest.fail(message + " (LMHP_REQUIRE_HOROVOD is set)", pytrace=False)
        pytest.skip(message)
    return {mpi.ALLREDUCE_ENV: name}
