#!/usr/bin/env python3
"""Train reward models and policies from human preferences.

    ./launch.py train_reward EXPERIMENT NAME [--mpi N] [--save_dir DIR] [--dry_run] [--some.hparam VALUE ...]
    ./launch.py train_policy EXPERIMENT NAME [--mpi N] [--save_dir DIR] [--dry_run] [--some.hparam VALUE ...]
    ./launch.py demo [NAME] [--save_dir DIR] [--some.hparam VALUE ...]   the offline demo, with a report
    ./launch.py label ...            write a label file with a synthetic judge (see README, "Offline demo")
    ./launch.py experiments          list the registered experiments

Outputs go to SAVE_DIR/NAME (default /tmp/save/train_reward or /tmp/save/train_policy).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fire  # noqa: E402

from lm_human_preferences import experiments, launcher  # noqa: E402


def train_reward(experiment, name, mpi=1, save_dir=None, dry_run=False, **overrides):
    """Train a reward model from preference labels (SPEC section 7)."""
    launcher.launch("train_reward", experiment, name, mpi=mpi, save_dir=save_dir, dry_run=dry_run,
                    overrides=overrides)


def train_policy(experiment, name, mpi=1, save_dir=None, dry_run=False, **overrides):
    """Fine-tune a policy with PPO against a reward model (SPEC section 8)."""
    launcher.launch("train_policy", experiment, name, mpi=mpi, save_dir=save_dir, dry_run=dry_run,
                    overrides=overrides)


def demo(name="demo", save_dir="/tmp/save/demo", **overrides):
    """The offline demo: synthetic labels -> reward model -> PPO, then a report and learning curves."""
    import tensorflow as tf
    from lm_human_preferences import demo as demo_module
    tf.compat.v1.disable_eager_execution()
    demo_module.run_demo(name, save_dir, overrides=overrides)


def list_experiments():
    """Print the registered experiments of each command."""
    for command, registry in experiments.EXPERIMENTS.items():
        print(f"{command}: {', '.join(sorted(registry))}")


def main():
    try:
        fire.Fire({"train_reward": train_reward, "train_policy": train_policy, "demo": demo,
                   "experiments": list_experiments}, name="launch.py")
    except ValueError as error:  # user errors (bad hparams, label files, paths): one clear line
        if os.environ.get("LMHP_TRACEBACK"):
            raise
        sys.exit(f"error: {error}\n(set LMHP_TRACEBACK=1 to see where it was raised)")


if __name__ == "__main__":
    main()
