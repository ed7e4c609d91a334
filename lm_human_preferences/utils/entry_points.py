"""What the entry points (launch.py, sample.py, bench.py) share before their work starts.

The project's Python. `make install` puts the dependencies into `.venv/` beside the scripts. A user who types
`./launch.py ...` without activating that environment starts the system's `python3`, which lacks them: instead
of a `ModuleNotFoundError` for `fire`, the script starts again under `.venv/bin/python`, or, when there is no
such environment, says in one line what to run. Nothing is imported to find out (`importlib.util.find_spec`
only looks the modules up), so the check costs milliseconds.

Quiet help. fire prints "INFO: Showing help with the command ..." before the help that `--help` asks for,
unless the flag comes after its `--` separator: `fire_argv` moves it there.

User errors in one line. A bad flag, hyperparameter, file or path raises ValueError with a message that names it;
inside `user_errors_in_one_line` that ends the process with `error: MESSAGE` and exit status 1 instead of a
traceback (LMHP_TRACEBACK=1 shows the traceback).
"""

import contextlib
import importlib.util
import os
import sys
from typing import List, Sequence

# What every entry point imports before its own work; each stands for a dependency of pyproject.toml.
REQUIRED_MODULES = ("fire", "numpy", "tensorflow", "mpi4py")


def missing_modules(modules: Sequence[str] = REQUIRED_MODULES) -> list:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def ensure_project_python(script: str, modules: Sequence[str] = REQUIRED_MODULES):
    """Return when this Python has `modules`; else re-run `script` with the same arguments under
    `.venv/bin/python` beside it (this call does not return), or exit with one `error:` line saying what to
    run. A `.venv` that lacks them too is reported, never re-run (no loop)."""
    missing = missing_modules(modules)
    if not missing:
        return
    root = os.path.dirname(os.path.abspath(script))
    venv = os.path.join(root, ".venv")
    venv_python = os.path.join(venv, "bin", "python")
    in_venv = os.path.realpath(sys.prefix) == os.path.realpath(venv)
    if os.access(venv_python, os.X_OK) and not in_venv:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(venv_python, [venv_python, os.path.abspath(script)] + sys.argv[1:])
    where = f"{venv_python} lacks" if in_venv else f"this Python ({sys.executable}) lacks"
    sys.exit(f"error: {where} the project's dependencies ({', '.join(missing)}): run `make install` in {root}, "
             f"then start {os.path.basename(script)} as ./{os.path.basename(script)} or with .venv/bin/python")


def fire_argv(argv: List[str]) -> List[str]:
    """The command line for fire: `--help` or `-h` (before any `--`) becomes fire's own `-- --help`, so the help
    comes without fire's "INFO: Showing help" line; of the arguments before it only a command's name is kept."""
    separator = argv.index("--") if "--" in argv else len(argv)
    ours = argv[:separator]
    if not any(arg in ("--help", "-h") for arg in ours):
        return list(argv)
    return [arg for arg in ours[:1] if not arg.startswith("-")] + ["--", "--help"]


TRACEBACK_HINT = "(set LMHP_TRACEBACK=1 to see where it was raised)"


@contextlib.contextmanager
def user_errors_in_one_line():
    """A ValueError raised inside ends the process with `error: MESSAGE` and the hint on how to see the traceback
    (mpi.exit_with_user_error: under an outer mpirun the whole job ends), unless LMHP_TRACEBACK is set."""
    try:
        yield
    except ValueError as error:
        if os.environ.get("LMHP_TRACEBACK"):
            raise
        from lm_human_preferences.utils import mpi  # here: the module needs the project's dependencies
        mpi.exit_with_user_error(str(error), TRACEBACK_HINT)
