"""MPI helpers: single-process behaviour, real `mpiexec -n 2` collectives, abort on one rank's error."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lm_human_preferences.utils import mpi

from mpi_programs import REPO_ROOT, rank_lines, run


def test_exact_div_names_the_hyperparameter():
    assert mpi.exact_div(64, 4, "ppo.batch_size") == 16
    with pytest.raises(ValueError) as info:
        mpi.exact_div(64, 3, "ppo.batch_size")
    assert str(info.value) == "ppo.batch_size=64 must be divisible by the number of MPI ranks (3)"
    with pytest.raises(ValueError, match=r"batch_size / ranks=16 must be divisible by ppo.nminibatches \(3\)"):
        mpi.exact_div(16, 3, "batch_size / ranks", "ppo.nminibatches")



@pytest.mark.parametrize("parts", [0, -2])
def test_exact_div_refuses_zero_or_negative_parts(parts):
    # -2 divides 64 exactly and 0 would raise ZeroDivisionError: both must be this message instead
    with pytest.raises(ValueError) as info:
        mpi.exact_div(64, parts, "ppo.batch_size / ranks", "ppo.nminibatches")
    assert str(info.value) == (f"ppo.batch_size / ranks=64: cannot split into ppo.nminibatches ({parts}); "
                               "it must be positive")

def test_single_process_never_initialises_mpi():
    """A plain python process is one rank; collectives return their input; mpi4py.MPI is never imported."""
    code = (
        "import sys, numpy as np\n"
        "from lm_human_preferences.utils import mpi\n"
        "assert (mpi.rank(), mpi.size(), mpi.local_rank(), mpi.is_root(), mpi.comm()) == (0, 1, 0, True, None)\n"
        "assert mpi.rank_seed(7) == 7 and mpi.rank_seed(None) is None\n"
        "assert mpi.broadcast('x') == 'x'\n"
        "mean = mpi.allreduce_mean(np.array([1, 2]))\n"
        "assert mean.dtype == np.float64 and mean.tolist() == [1.0, 2.0]\n"
        "assert mpi.mean_dict({'a': 1}) == {'a': 1.0}\n"
        "mpi.barrier(); mpi.install_abort_on_error()\n"
        "assert 'mpi4py.MPI' not in sys.modules, 'MPI was initialised in a plain process'\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    env["PYTHONPATH"] = REPO_ROOT
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_mpiexec_command_uses_the_venv_mpiexec():
    argv = mpi.mpiexec_command(3)
    assert argv[0] == os.path.join(os.path.dirname(sys.executable), "mpiexec")
    assert argv[-2:] == ["-n", "3"]
    with pytest.raises(ValueError, match="positive"):
        mpi.mpiexec_command(0)


def test_two_ranks_allreduce_broadcast_and_mean_stats():
    result = run(2, "collectives.py")
    assert result.returncode == 0, result.stdout
    reports = {r: json.loads(line) for r, line in rank_lines(result.stdout, "RESULT").items()}
    assert sorted(reports) == [0, 1], result.stdout
    for rank, report in reports.items():
        assert report["size"] == 2
        assert report["is_root"] == (rank == 0)
        assert report["seed"] == 1 + 100003 * rank  # the 2019 per-rank offset
        assert report["local_rank"] == rank  # both on this machine
        # mean of [1,2,3]*1 and [1,2,3]*2
        np.testing.assert_allclose(report["mean"], [1.5, 3.0, 4.5])
        assert report["mean_dtype"] == "float32"
        assert report["obj"] == {"from": 0, "items": [0, 0, 0]}
        assert report["stats"] == {"loss": 0.5, "score": 5.0}


def test_error_on_one_rank_ends_the_job_with_that_error():
    start = time.time()
    result = run(2, "fail_on_rank1.py", timeout=90)
    elapsed = time.time() - start
    assert result.returncode != 0
    assert "error: deliberate failure on rank 1\n" in result.stdout  # a user error (ValueError): its one line
    assert "Traceback" not in result.stdout
    assert "rank 0 got past the barrier" not in result.stdout
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end"
    traced = run(2, "fail_on_rank1.py", env={"LMHP_TRACEBACK": "1"}, timeout=90)  # asked for: where, on which rank
    assert traced.returncode != 0
    assert "[rank 1 of 2] uncaught exception, aborting the job:\nTraceback" in traced.stdout
    assert "ValueError: deliberate failure on rank 1" in traced.stdout


# ----- which gradient all-reduce: LMHP_ALLREDUCE ------------------------------------------------------------------

def test_an_unknown_allreduce_is_refused_before_any_rank_starts(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", LMHP_ALLREDUCE="nccl")
    result = subprocess.run([sys.executable, "launch.py", "train_reward", "test", "run", "--mpi", "2",
                             "--save_dir", str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == ("error: LMHP_ALLREDUCE='nccl': expected one of horovod, mpi4py (or "
                                             "unset: horovod when it is installed, else mpi4py)")
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


def test_forcing_horovod_where_it_is_not_installed_names_the_build_command(monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "horovod"
                        else real_find_spec(name, *a))
    monkeypatch.setenv("LMHP_ALLREDUCE", "horovod")
    with pytest.raises(ValueError, match=r"^LMHP_ALLREDUCE=horovod, but horovod is not installed; build it into this "
                                         r"environment with `make horovod`, or set LMHP_ALLREDUCE=mpi4py$"):
        mpi.check_allreduce_choice(2)
    mpi.check_allreduce_choice(1)  # one process all-reduces nothing: no need for horovod
    monkeypatch.setenv("LMHP_ALLREDUCE", "mpi4py")
    mpi.check_allreduce_choice(2)


def test_a_broken_horovod_is_an_error_when_forced_and_passed_over_otherwise(tmp_path):
    shadow = tmp_path / "shadow" / "horovod"  # a horovod that fails to import, as a build for another TensorFlow does
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN10tensorflow8OpKernel')\n")
    pythonpath = f"{shadow.parent}{os.pathsep}{REPO_ROOT}"
    forced = run(2, "train_ops_ranks.py", tmp_path, env={"PYTHONPATH": pythonpath, "LMHP_ALLREDUCE": "horovod"})
    assert forced.returncode != 0
    assert ("error: LMHP_ALLREDUCE=horovod, but horovod does not work here (ImportError: undefined symbol: "
            "_ZN10tensorflow8OpKernel); build it into this environment with `make horovod`, or set "
            "LMHP_ALLREDUCE=mpi4py") in forced.stdout
    assert not (tmp_path / "rank0.npz").exists()
    unforced = run(2, "train_ops_ranks.py", tmp_path, env={"PYTHONPATH": pythonpath, "LMHP_ALLREDUCE": ""})
    assert unforced.returncode == 0, unforced.stdout
    assert "gradient all-reduce: mpi4py across 2 ranks" in unforced.stdout
