"""From `./launch.py COMMAND EXPERIMENT NAME [flags]` to a running job.

`launch` resolves the experiment's bindings and the command-line overrides into the command's typed
HParams, validates them, and then prints them (`--dry_run`), runs the job in this process, or re-launches
itself under `mpiexec -n N` (`--mpi N`). The ranks receive the resolved hyperparameters as JSON on their
command line, so nothing is pickled into a shared /tmp path and two runs at once never collide.

The module is also the ranks' entry point: `python -m lm_human_preferences.launcher COMMAND HPARAMS_JSON`.
"""

import contextlib
import importlib
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Tuple

from lm_human_preferences import experiments
from lm_human_preferences.utils.hyperparams import HParams

# command -> module defining `HParams` (the command's hyperparameters) and `train(hparams)`.
COMMANDS = {
    "train_reward": "lm_human_preferences.train_reward",
    "train_policy": "lm_human_preferences.train_policy",
}

DEFAULT_SAVE_DIRS = {"train_reward": "/tmp/save/train_reward", "train_policy": "/tmp/save/train_policy"}

# The directory holding the `lm_human_preferences` package: the ranks import it from there.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_module(command: str):
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; known commands: {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[command])


def resolve_hparams(command: str, experiment: str, name: str, *, save_dir: str = None,
                    overrides: Dict[str, Any] = None) -> HParams:
    """The validated hyperparameters of `experiment` with `overrides` applied, saving to SAVE_DIR/NAME."""
    bindings = experiments.get(command, experiment)
    hparams = command_module(command).HParams()
    hparams.override_from_dict(bindings)
    overrides = dict(overrides or {})
    hparams.override_from_dict(overrides)
    if command == "train_policy" and hparams.rewards.train_new_model is not None:
        # The reward model trained first must see the same task as the policy: a `--task.X` override
        # applies to both, unless the user set `--rewards.train_new_model.task.X` explicitly.
        nested = {f"rewards.train_new_model.{name}": value for name, value in overrides.items()
                  if name.startswith("task.") and f"rewards.train_new_model.{name}" not in overrides}
        hparams.override_from_dict(nested)
    if save_dir is None and "run.save_dir" not in overrides:
        save_dir = DEFAULT_SAVE_DIRS[command]
    if save_dir is not None:
        hparams.run.save_dir = os.path.join(os.path.expanduser(save_dir), name)
    return hparams.validate()


def check_mpi(mpi) -> int:
    if not isinstance(mpi, int) or isinstance(mpi, bool) or mpi < 1:
        raise ValueError(f"--mpi: got {mpi!r}, expected a positive number of processes")
    return mpi


def launch(command: str, experiment: str, name: str, *, mpi: int = 1, save_dir: str = None,
           dry_run: bool = False, overrides: Dict[str, Any] = None):
    check_mpi(mpi)
    hparams = resolve_hparams(command, experiment, name, save_dir=save_dir, overrides=overrides)
    if dry_run:
        print(hparams.to_json())
        return hparams
    if mpi == 1:
        run(command, hparams)
        return hparams
    argv, env = rank_command(command, hparams, mpi)
    returncode = subprocess.call(argv, env=env)
    if returncode != 0:
        sys.exit(returncode)
    return hparams


def rank_command(command: str, hparams: HParams, mpi: int) -> Tuple[List[str], Dict[str, str]]:
    """argv and environment that start `mpi` ranks of this module, each running `command` with `hparams`.

    PYTHONPATH leads with the package's directory so that the ranks import this checkout even when it is
    not pip-installed and `launch.py` was started from another directory.
    """
    from lm_human_preferences.utils import mpi as mpi_utils
    argv = mpi_utils.mpiexec_command(check_mpi(mpi)) + [
        sys.executable, "-m", "lm_human_preferences.launcher", command, hparams.to_json()]
    python_path = [PACKAGE_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return argv, dict(os.environ, PYTHONPATH=os.pathsep.join(python_path))


@contextlib.contextmanager
def abort_job_on_exit():
    """A `sys.exit` with a failure code on one MPI rank ends the whole job.

    `sys.exit` raises SystemExit, which never reaches `sys.excepthook` (where `mpi.install_abort_on_error`
    catches exceptions): the rank would wait in MPI_Finalize while the others wait for it in a collective,
    a hang. So we abort with the rank's code. With a single process, or exit code 0, nothing changes.
    """
    try:
        yield
    except SystemExit as request:
        from lm_human_preferences.utils import mpi
        world = mpi.comm()
        if world is not None and request.code not in (None, 0):
            code = request.code if isinstance(request.code, int) else 1  # sys.exit("message") means 1
            sys.stderr.write(f"[rank {world.Get_rank()} of {world.Get_size()}] exited with code {code}"
                             + ("" if isinstance(request.code, int) else f": {request.code}")
                             + "; aborting the job\n")
            sys.stderr.flush()
            sys.stdout.flush()
            world.Abort(code)  # ends every rank; does not return
        raise


def run(command: str, hparams: HParams):
    """Run the job in this process (one MPI rank, or the only process)."""
    import tensorflow as tf
    from lm_human_preferences.utils import mpi
    mpi.install_abort_on_error()
    tf.compat.v1.disable_eager_execution()
    with abort_job_on_exit():
        command_module(command).train(hparams)


def hparams_from_json(command: str, hparams_json: str) -> HParams:
    """The validated hyperparameters a rank received on its command line (the output of HParams.to_json)."""
    try:
        data = json.loads(hparams_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"the {command} hyperparameters are not valid JSON ({error}); expected the nested "
                         f"object that `./launch.py {command} EXPERIMENT NAME --dry_run` prints") from None
    return command_module(command).HParams.from_nested_dict(data).validate()


USAGE = "usage: python -m lm_human_preferences.launcher COMMAND HPARAMS_JSON  (COMMAND: train_reward, train_policy)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit(USAGE)
    command, hparams_json = argv
    try:
        hparams = hparams_from_json(command, hparams_json)
    except ValueError as error:  # every rank got the same JSON, so every rank stops here alike: no hang
        sys.exit(f"error: {error}")
    run(command, hparams)


if __name__ == "__main__":
    main()
