"""The entry points start as the README shows them (`./launch.py`, `./sample.py`, `./bench.py`): executable, and
under the project's Python even when typed without an activated environment (lm_human_preferences/utils/
project_python.py). `python -S` stands for a Python without the dependencies: it sees no site-packages."""

import os
import shutil
import subprocess
import sys

import pytest

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
    for module in ("__init__.py", "utils/__init__.py", "utils/project_python.py"):
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
