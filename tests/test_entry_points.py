"""The entry points start as the README shows them (`./launch.py`, `./sample.py`, `./bench.py`): executable, and
under the project's Python even when typed without an activated environment (lm_human_preferences/utils/
entry_points.py). `python -S` stands for a Python without the dependencies: it sees no site-packages."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from lm_human_preferences.utils import devices

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch.py", "sample.py", "bench.py")
REPO_VENV_PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")


def run_bare_python(*argv, python=sys.executable):
    """`python -S SCRIPT ...`: no site-packages, so fire, numpy and TensorFlow cannot be found."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    return subprocess.run([python, "-S", *argv], cwd="/", env=env, capture_output=True, text=True, timeout=120)


def copy_scripts_without_venv(directory):
    """The entry points and the one module they need before re-running, in a directory with no .venv."""
    for script in SCRIPTS:
        shutil.copy2(os.path.join(REPO_ROOT, script), directory / script)
    package = directory / "lm_human_preferences" / "utils"
    package.mkdir(parents=True)
    for module in ("__init__.py", "utils/__init__.py", "utils/entry_points.py"):
        shutil.copy2(os.path.join(REPO_ROOT, "lm_human_preferences", module), directory / "lm_human_preferences" / module)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_entry_point_is_executable_in_git_and_here(script):
    staged = subprocess.run(["git", "ls-files", "--stage", script], cwd=REPO_ROOT, capture_output=True, text=True)
    if staged.returncode != 0 or not staged.stdout:
        pytest.skip("not a git checkout")
    assert staged.stdout.split()[0] == "100755", f"{script} is not executable in git: {staged.stdout.strip()}"
    assert os.access(os.path.join(REPO_ROOT, script), os.X_OK)


@pytest.mark.skipif(not os.path.exists(REPO_VENV_PYTHON), reason="no .venv beside the scripts (make install)")
@pytest.mark.parametrize("argv, expected", [
    (["launch.py", "experiments"], "train_policy: "),
    (["sample.py", "sample", "--help"], "sample.py sample SAVE_DIR"),
    (["bench.py", "--help"], "bench.py <flags>"),
])
def test_a_python_without_the_dependencies_reruns_the_script_under_the_venv(argv, expected):
    result = run_bare_python(os.path.join(REPO_ROOT, argv[0]), *argv[1:])
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout + result.stderr  # fire writes --help to stderr
    assert "ModuleNotFoundError" not in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_a_venv_one_line_says_what_to_run(tmp_path, script):
    copy_scripts_without_venv(tmp_path)
    result = run_bare_python(str(tmp_path / script), "--help")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "make install" in lines[0] and ".venv/bin/python" in lines[0]
    assert "fire" in lines[0]


def test_a_venv_that_lacks_the_dependencies_is_reported_not_rerun_forever(tmp_path):
    copy_scripts_without_venv(tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True,
                   capture_output=True)
    result = run_bare_python(str(tmp_path / "launch.py"), "experiments")  # re-runs once, under the empty .venv
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "make install" in lines[0], result.stderr
    assert os.path.join(str(tmp_path), ".venv", "bin", "python") in lines[0]


# ----- no noise: --help imports no TensorFlow, and TensorFlow loads without its start-up notices -------------------

# TensorFlow's C++ start-up lines (glog format or absl's notice), as a user saw them before every command
TF_STARTUP_LINE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|I\d{4} [\d:.]+ +\d+ |"
                             r"[EW]\d{4} [\d:.]+ +\d+ \S+\] failed call to cuInit)|Could not find cuda drivers", re.M)


def run_script(*argv, timeout=300, python_flags=()):
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: the scripts must be quiet by themselves
    return subprocess.run([sys.executable, *python_flags, *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("argv", [["launch.py", "train_policy", "--help"], ["launch.py", "label", "-h"],
                                  ["sample.py", "sample", "--help"], ["sample.py", "sample", "--save_dir", "x", "-h"],
                                  ["bench.py", "--help"], ["bench.py", "--size", "test", "--help"]])
def test_help_imports_no_tensorflow_and_shows_no_fire_noise(argv):
    result = run_script(*argv, python_flags=["-X", "importtime"])  # every imported module, on stderr
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "fire" in imported
    assert not [name for name in imported if name.split(".")[0] == "tensorflow"], "--help imported TensorFlow"
    shown = result.stdout + "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    assert "SYNOPSIS" in shown
    assert "INFO: Showing help" not in shown
    assert "Optional[]" not in shown and "Optional[Optional]" not in shown


def test_tensorflow_startup_notices_are_dropped_and_other_output_kept(capfd, monkeypatch):
    monkeypatch.setattr(devices, "has_nvidia_device", lambda: False)
    with devices.tensorflow_startup_quiet():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                    b"I0000 00:00:1795562773.559265   25605 port.cc:153] oneDNN custom operations are on.\n"
                    b"E0000 00:00:1795563019.793494   28187 cuda_platform.cc:52] failed call to cuInit: "
                    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
                    b"W0000 00:00:1795563019.793494   28187 something.cc:1] a real warning\n")
        os.write(2, b"a message of ours\n")
    assert capfd.readouterr().err == ("W0000 00:00:1795563019.793494   28187 something.cc:1] a real warning\n"
                                      "a message of ours\n")
    monkeypatch.setattr(devices, "has_nvidia_device", lambda: True)  # with a GPU, a cuInit failure is news
    with devices.tensorflow_startup_quiet():
        os.write(2, b"E0000 00:00:1.5   28187 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
    assert "failed call to cuInit" in capfd.readouterr().err


def test_dry_run_and_a_run_of_the_test_experiment_print_no_tensorflow_startup_lines(tmp_path):
    dry = run_script("launch.py", "train_policy", "test", "x", "--save_dir", str(tmp_path), "--dry_run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert not TF_STARTUP_LINE.search(dry.stdout + dry.stderr), dry.stderr
    assert dry.stderr.strip() == "--mpi not given: 1 rank (no GPU found)" or devices.gpu_count()
    run = run_script("launch.py", "train_policy", "test", "x", "--save_dir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert not TF_STARTUP_LINE.search(run.stdout + run.stderr), run.stderr
    # the test experiment's 2 updates: statistics each, but its 3 decoded samples once (log_interval 10)
    assert run.stdout.count("update 1/2 |") == 1 and run.stdout.count("update 2/2 |") == 1
    assert run.stdout.count("=" * 80 + "\n") == 3, run.stdout
