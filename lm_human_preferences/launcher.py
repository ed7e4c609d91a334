"""From `./launch.py COMMAND EXPERIMENT NAME [flags]` to a running job.

`launch` resolves the experiment's bindings and the command-line overrides into the command's typed
HParams, validates them, and then prints them (`--dry_run`), runs the job in this process, or re-launches
itself under `mpiexec -n N` (`--mpi N`). The ranks receive the resolved hyperparameters as JSON on their
command line, so nothing is pickled into a shared /tmp path and two runs at once never collide.

The module is also the ranks' entry point: `python -m lm_human_preferences.launcher COMMAND HPARAMS_JSON`.
"""

import importlib
import json
import os
import subprocess
import sys
from typing import Any, Dict

from lm_human_preferences import experiments
from lm_human_preferences.utils.hyperparams import HParams

# command -> module defining `HParams` (the command's hyperparameters) and `train(hparams)`.
COMMANDS = {
    "train_reward": "lm_human_preferences.train_reward",
    "train_policy": "lm_human_preferences.train_policy",
}

DEFAULT_SAVE_DIRS = {"train_reward": "/tmp/save/train_reward", "train_policy": "/tmp/save/train_policy"}


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
    if save_dir is None and "run.save_dir" not in (overrides or {}):
        save_dir = DEFAULT_SAVE_DIRS[command]
    if save_dir is not None:
        hparams.run.save_dir = os.path.join(save_dir, name)
    return hparams.validate()


def launch(command: str, experiment: str, name: str, *, mpi: int = 1, save_dir: str = None,
           dry_run: bool = False, overrides: Dict[str, Any] = None):
    hparams = resolve_hparams(command, experiment, name, save_dir=save_dir, overrides=overrides)
    if dry_run:
        print(hparams.to_json())
        return hparams
    if not isinstance(mpi, int) or isinstance(mpi, bool) or mpi < 1:
        raise ValueError(f"--mpi: got {mpi!r}, expected a positive number of processes")
    if mpi == 1:
        run(command, hparams)
        return hparams
    from lm_human_preferences.utils import mpi as mpi_utils
    argv = mpi_utils.mpiexec_command(mpi) + [
        sys.executable, "-m", "lm_human_preferences.launcher", command, hparams.to_json()]
    returncode = subprocess.call(argv)
    if returncode != 0:
        sys.exit(returncode)
    return hparams


def run(command: str, hparams: HParams):
    """Run the job in this process (one MPI rank, or the only process)."""
    import tensorflow as tf
    from lm_human_preferences.utils import mpi
    mpi.install_abort_on_error()
    tf.compat.v1.disable_eager_execution()
    command_module(command).train(hparams)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit("usage: python -m lm_human_preferences.launcher COMMAND HPARAMS_JSON")
    command, hparams_json = argv
    hparams = command_module(command).HParams.from_nested_dict(json.loads(hparams_json)).validate()
    run(command, hparams)


if __name__ == "__main__":
    main()
