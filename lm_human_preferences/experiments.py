"""The registry of named experiments: the paper's settings, `test` and `demo`, and sweeps over them.

An experiment is a list of bindings, (dotted hyperparameter name, value) pairs, built from small groups:
`bind` one value, `combine` groups, `nest` a group under a prefix (the reward experiment sits under
`rewards.train_new_model` inside a policy experiment). Later bindings override earlier ones, so a group can
be reshaped by appending to it, and command-line overrides are applied after all of them.

Sweeps (the 2019 registry's `combos`). `sweep(name, values)` binds one hyperparameter to several values; an
experiment holding sweeps is a list of trials, one per combination of the swept values (the cross product
of all its sweeps, in the order they were first bound), and `trials` lists them. Like any binding, a sweep
composes with `combine` and `nest`, and a later binding of the same name replaces it (a later sweep, or a
single value, which collapses the sweep); so does a command-line override of a swept name.

Each trial has a descriptor that names its directory: it is saved under SAVE_DIR/NAME/DESCRIPTOR, while an
experiment without sweeps (one trial, descriptor "") saves to SAVE_DIR/NAME. The descriptor joins, with
"-", one part per sweep: the sweep's key (by default the last component of the swept name) followed by the
value, e.g. `seed1`, or `seed2-lr1e-05` for a sweep of run.seed crossed with one of lr. Values are written
as the command line would take them (floats by Python's shortest repr, `true`/`false`, `none`), with any
character outside letters, digits and `._+-` replaced by `_`, so a descriptor is one safe directory name.
"""

import dataclasses
import difflib
import itertools
import os
import re
from typing import Any, Collection, Dict, List, Tuple

from lm_human_preferences.hparams import TrainPolicyHParams, TrainRewardHParams
from lm_human_preferences.utils import files
from lm_human_preferences.utils.hyperparams import HParams

Bindings = List[Tuple[str, Any]]

LABELS_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels"


def bind(name: str, value: Any) -> Bindings:
    return [(name, value)]


def combine(*groups: Bindings) -> Bindings:
    return [binding for group in groups for binding in group]


def nest(prefix: str, group: Bindings) -> Bindings:
    return [(f"{prefix}.{name}", value) for name, value in group]


def resolve(group: Bindings) -> Dict[str, Any]:
    """Flatten to {dotted name: value}, later bindings winning (a swept name maps to its `Sweep`)."""
    return dict(group)


# ----- sweeps ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sweep:
    """The value of a swept binding: one trial per value."""
    values: Tuple[Any, ...]
    key: str  # the descriptor's prefix for this sweep, e.g. "seed" in `seed1`


@dataclasses.dataclass(frozen=True)
class Trial:
    """One combination of an experiment's swept values."""
    descriptor: str  # its directory under SAVE_DIR/NAME; "" when the experiment has no sweep
    swept: Dict[str, Any]  # {swept name: this trial's value}
    bindings: Dict[str, Any]  # every binding of the trial, resolved


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def describe(value: Any) -> str:
    """A swept value as it appears in a descriptor: `1`, `1e-05`, `true`, `none`; filesystem-safe."""
    if value is None or isinstance(value, bool):
        text = str(value).lower()
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    return _UNSAFE.sub("_", text)


def sweep(name: str, values, *, key: str = None) -> Bindings:
    """Bind `name` to each of `values` in turn: one trial per value (crossed with the other sweeps).

    `key` starts the value's part of the descriptor; it defaults to the last component of `name`
    (`sweep("run.seed", [1, 2])` gives trials `seed1` and `seed2`).
    """
    values = tuple(values)
    key = name.rsplit(".", 1)[-1] if key is None else key
    if not values:
        raise ValueError(f"sweep of {name}: no values given; expected at least one")
    if _UNSAFE.search(key):
        raise ValueError(f"sweep of {name}: key {key!r} must hold only letters, digits and ._+-")
    parts = [key + describe(value) for value in values]
    if len(set(parts)) != len(parts):
        raise ValueError(f"sweep of {name}: values {list(values)} give repeated descriptors {parts}")
    return [(name, Sweep(values, key))]


def trials(group: Bindings, fixed: Collection[str] = ()) -> List[Trial]:
    """The trials of an experiment: one per combination of its swept values, in order.

    Names in `fixed` (the command-line overrides) are not swept: the override gives their one value, so
    their bindings are left out here.
    """
    resolved = {name: value for name, value in resolve(group).items()
                if not (isinstance(value, Sweep) and name in fixed)}
    swept = [(name, value) for name, value in resolved.items() if isinstance(value, Sweep)]
    result = []
    for combination in itertools.product(*(value.values for _, value in swept)):
        parts = [value.key + describe(choice) for (_, value), choice in zip(swept, combination)]
        chosen = {name: choice for (name, _), choice in zip(swept, combination)}
        bindings = {name: chosen.get(name, value) for name, value in resolved.items()}
        result.append(Trial("-".join(parts), chosen, bindings))
    descriptors = [trial.descriptor for trial in result]
    repeated = sorted({d for d in descriptors if descriptors.count(d) > 1})
    if repeated:
        keys = ", ".join(f"{name} (key {value.key!r})" for name, value in swept)
        raise ValueError(f"sweeps of {keys} give trials with the same descriptor {repeated}; "
                         f"give the sweeps distinct keys: sweep(name, values, key=...)")
    return result


# ----- tasks ---------------------------------------------------------------------------------------------------

books_task = nest("task", combine(
    bind("query_length", 64),
    bind("query_dataset", "books"),
    bind("response_length", 24),
    bind("start_text", "."),  # queries start after a sentence boundary...
    bind("end_text", "."),  # ...and end on one
    bind("truncate_token", 13),  # "." ends a response
    bind("truncate_after", 16),
    bind("policy.temperature", 0.7),
    bind("policy.initial_model", "124M"),
))

summarize_task = nest("task", combine(
    bind("query_length", 500),
    bind("response_length", 75),
    bind("start_text", None),
    bind("truncate_after", 55),
    bind("truncate_token", 198),  # "\n" ends a summary
    bind("query_suffix", "\n\nTL;DR:"),
    bind("policy.initial_model", "124M"),
))

cnndm_task = combine(summarize_task, nest("task", combine(
    bind("query_dataset", "cnndm"),
    bind("query_prefix", "Article:\n\n"),
    bind("end_text", "\n"),
    bind("policy.temperature", 0.5),
)))

tldr_task = combine(summarize_task, nest("task", combine(
    bind("query_dataset", "tldr"),
    bind("policy.temperature", 0.7),
)))

# A tiny task on the random `test` model (n_ctx 8): runs in seconds on a CPU, for tests and smoke checks.
test_task = nest("task", combine(
    bind("query_length", 3),
    bind("query_dataset", "test"),
    bind("response_length", 4),
    bind("start_text", None),
    bind("end_text", None),
    bind("truncate_token", None),
    bind("policy.temperature", 1.0),
    bind("policy.initial_model", "test"),
))

# The offline demo: the small random `demo` model (n_ctx 64) on the 27-letter alphabet.
demo_task = nest("task", combine(
    bind("query_length", 8),
    bind("query_dataset", "test"),
    bind("response_length", 12),
    bind("start_text", None),
    bind("end_text", None),
    bind("truncate_token", None),
    bind("policy.temperature", 1.0),
    bind("policy.initial_model", "demo"),
))

# ----- reward experiments (train_reward) -----------------------------------------------------------------------

_reward_common = combine(
    bind("labels.type", "best_of_4"),
    bind("normalize_before", True),
    bind("normalize_after", True),
    bind("normalize_samples", 256),
    bind("run.seed", 1),
)


def _reward(task: Bindings, *rest: Bindings, source, num_train, batch_size, lr, rollout_batch_size) -> Bindings:
    """A reward experiment: the task, the shared settings, its labels and batch sizes, then `rest`."""
    return combine(task, _reward_common, bind("labels.source", source), bind("labels.num_train", num_train),
                   bind("batch_size", batch_size), bind("lr", lr), bind("rollout_batch_size", rollout_batch_size),
                   *rest)


def _book_reward(label_set: str) -> Bindings:
    return _reward(books_task, source=f"{LABELS_URL}/{label_set}/offline_5k.json", num_train=4_992, batch_size=32,
                   lr=5e-5, rollout_batch_size=512)


def _summary_reward(task: Bindings, label_set: str) -> Bindings:
    return _reward(task, source=f"{LABELS_URL}/{label_set}/online_45k.json", num_train=46_000, batch_size=16,
                   lr=2.5e-5, rollout_batch_size=128)


REWARD_EXPERIMENTS: Dict[str, Bindings] = {
    "sentiment": _book_reward("sentiment"),
    "descriptiveness": _book_reward("descriptiveness"),
    "cnndm": _summary_reward(cnndm_task, "cnndm"),
    "tldr": _summary_reward(tldr_task, "tldr"),
    # labels made by the synthetic judge (or --labels.source FILE)
    "test": _reward(test_task, bind("labels.judge", "letter_e"), bind("normalize_samples", 16),
                    source=None, num_train=16, batch_size=8, lr=1e-3, rollout_batch_size=8),
    # labels made by the synthetic labeler: samples of the initial policy, judged
    "demo": _reward(demo_task,
                    bind("labels.judge", "letter_e"),  # prefers responses with many e's
                    bind("labels.judge_temperature", 0.03),  # a little human-like noise in its choices
                    bind("labels.num_valid", 512),
                    source=None, num_train=2048, batch_size=32, lr=1e-3, rollout_batch_size=64),
}
# Two seeds of `test`: a sweep small enough to run in seconds (tests, and a first try of sweeps).
REWARD_EXPERIMENTS["test_seeds"] = combine(REWARD_EXPERIMENTS["test"], sweep("run.seed", [1, 2]))

# ----- policy experiments (train_policy) ------------------------------------------------------------------------


def _policy(reward_name: str, *rest: Bindings) -> Bindings:
    reward = REWARD_EXPERIMENTS[reward_name]
    task = [(name, value) for name, value in reward if name.startswith("task.")]
    return combine(task, nest("rewards.train_new_model", reward), bind("run.seed", 1), *rest)


_book_policy = combine(
    bind("ppo.lr", 1e-5),
    bind("ppo.total_episodes", 1_000_000),
    bind("ppo.batch_size", 512),
    bind("rewards.kl_coef", 0.15),
    bind("rewards.adaptive_kl", "on"),
    bind("rewards.adaptive_kl.target", 6.0),
)

_summary_policy = combine(
    bind("ppo.total_episodes", 1_000_000),
    bind("ppo.lr", 2e-6),
    bind("ppo.batch_size", 32),
    bind("ppo.whiten_rewards", False),
)

POLICY_EXPERIMENTS: Dict[str, Bindings] = {
    "sentiment": _policy("sentiment", _book_policy),
    "descriptiveness": _policy("descriptiveness", _book_policy),
    "cnndm": _policy("cnndm", _summary_policy, bind("rewards.kl_coef", 0.01)),
    "tldr": _policy("tldr", _summary_policy, bind("rewards.kl_coef", 0.03)),
    "test": _policy("test",
                    bind("ppo.total_episodes", 16),
                    bind("ppo.batch_size", 8),
                    bind("ppo.lr", 1e-3),
                    bind("ppo.noptepochs", 2),
                    bind("rewards.kl_coef", 0.1)),  # samples logged at the first update only (log_interval 10)
    "demo": _policy("demo",
                    bind("ppo.total_episodes", 12_800),
                    bind("ppo.batch_size", 64),
                    bind("ppo.nminibatches", 2),
                    bind("ppo.lr", 1e-3),
                    bind("rewards.kl_coef", 0.05),
                    bind("rewards.adaptive_kl", "on"),
                    bind("rewards.adaptive_kl.target", 6.0),
                    bind("rewards.adaptive_kl.horizon", 3_000),  # short: the demo has 12,800 episodes
                    bind("run.log_interval", 25),
                    bind("run.save_interval", 100),
                    bind("run.judge", "letter_e")),  # log the judge's true score of every rollout
}

# The demo with labels collected online (paper section 2.3, as its summarization runs): the judge labels 512
# samples of the initial policy, then samples of the current policy every 1,280 episodes on the paper's l(n)
# schedule (towards 2,048), and each round retrains the reward model on all labels so far (online_labels.py).
POLICY_EXPERIMENTS["demo_online"] = combine(
    POLICY_EXPERIMENTS["demo"],
    bind("labels.online", "on"),
    bind("labels.online.judge", "letter_e"),
    bind("labels.online.judge_temperature", 0.03),  # the demo's noisy judge
    bind("labels.online.initial_labels", 512),
    bind("labels.online.total_labels", 2048),
    bind("labels.online.episodes_between_rounds", 1_280),  # 10 trainings in 12,800 episodes (paper: 20 in 2M)
)

# Seeds vary widely in the paper's runs (its curves average 10 of them): the same experiment with seeds 1, 2
# and 3, each trial in SAVE_DIR/NAME/seedN. Each trial trains its own reward model (seed 1, the nested
# experiment's); to share one, add --rewards.train_new_model off --rewards.trained_model PATH.
POLICY_EXPERIMENTS["descriptiveness_seeds"] = combine(POLICY_EXPERIMENTS["descriptiveness"],
                                                      sweep("run.seed", [1, 2, 3]))
POLICY_EXPERIMENTS["test_seeds"] = combine(POLICY_EXPERIMENTS["test"], sweep("run.seed", [1, 2]))

EXPERIMENTS = {"train_reward": REWARD_EXPERIMENTS, "train_policy": POLICY_EXPERIMENTS}


def lookup(command: str, name: str) -> Bindings:
    """The bindings of experiment `name` for `command` (sweeps unexpanded); unknown names list the known ones."""
    if command not in EXPERIMENTS:
        raise ValueError(f"unknown command {command!r}; known commands: {', '.join(EXPERIMENTS)}")
    registry = EXPERIMENTS[command]
    if name not in registry:
        close = difflib.get_close_matches(str(name), registry, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown {command} experiment {name!r}{hint}; "
                         f"known experiments: {', '.join(sorted(registry))}")
    return registry[name]


# ----- a command's hyperparameters from an experiment ------------------------------------------------------------

# command -> its hyperparameters, declared in hparams.py without TensorFlow: resolving, checking and printing them
# (--dry_run) loads none.
COMMAND_HPARAMS = {"train_reward": TrainRewardHParams, "train_policy": TrainPolicyHParams}

DEFAULT_SAVE_DIRS = {"train_reward": "/tmp/save/train_reward", "train_policy": "/tmp/save/train_policy"}


def command_hparams(command: str) -> type:
    """The HParams class of `command` (no TensorFlow is imported)."""
    if command not in COMMAND_HPARAMS:
        raise ValueError(f"unknown command {command!r}; known commands: {', '.join(COMMAND_HPARAMS)}")
    return COMMAND_HPARAMS[command]


def resolve_trials(command: str, experiment: str, name: str, *, save_dir: str = None,
                   overrides: Dict[str, Any] = None) -> List[Tuple[Trial, HParams]]:
    """Each trial of `experiment` with its validated hyperparameters, `overrides` applied to every trial.

    A trial saves to SAVE_DIR/NAME/DESCRIPTOR, or SAVE_DIR/NAME when the experiment is a single trial; an
    explicit `run.save_dir` override replaces SAVE_DIR/NAME. Overriding a swept name collapses its sweep.
    """
    command_hparams(command)  # an unknown command fails here, before the registry is read
    overrides = dict(overrides or {})
    if save_dir is None and "run.save_dir" not in overrides:
        save_dir = DEFAULT_SAVE_DIRS[command]
    resolved = []
    for trial in trials(lookup(command, experiment), fixed=overrides):
        hparams = _trial_hparams(command, trial.bindings, overrides)
        if save_dir is not None:
            hparams.run.save_dir = os.path.join(os.path.expanduser(save_dir), name)
        if trial.descriptor:
            hparams.run.save_dir = os.path.join(hparams.run.save_dir, trial.descriptor)
        if command == "train_policy":
            hparams.place_reward_model()  # SAVE_DIR/NAME/reward_model: shown by --dry_run, used by the run
        resolved.append((trial, hparams.validate()))
    return resolved


def _trial_hparams(command: str, bindings: Dict[str, Any], overrides: Dict[str, Any]) -> HParams:
    hparams = command_hparams(command)()
    hparams.override_from_dict(bindings)
    hparams.override_from_dict(overrides)
    if command == "train_policy" and hparams.rewards.train_new_model is not None:
        # The reward model trained first must see the same task as the policy: a `--task.X` override
        # applies to both, unless the user set `--rewards.train_new_model.task.X` explicitly.
        nested = {f"rewards.train_new_model.{name}": value for name, value in overrides.items()
                  if name.startswith("task.") and f"rewards.train_new_model.{name}" not in overrides}
        hparams.override_from_dict(nested)
    return hparams


def resolve_hparams(command: str, experiment: str, name: str, *, save_dir: str = None,
                    overrides: Dict[str, Any] = None) -> HParams:
    """The validated hyperparameters of a single-trial `experiment` with `overrides` applied, saving to
    SAVE_DIR/NAME. A sweep is an error unless the overrides fix every swept name."""
    resolved = resolve_trials(command, experiment, name, save_dir=save_dir, overrides=overrides)
    if len(resolved) > 1:
        swept = ", ".join(resolved[0][0].swept)
        raise ValueError(f"{command} experiment {experiment!r} is a sweep of {len(resolved)} trials (over {swept}); "
                         f"expected a single trial: override {swept} to pick one")
    return resolved[0][1]


def run_exists(save_dir: str) -> bool:
    """Whether SAVE_DIR/NAME already holds anything (a local directory that is not empty, or gs:// objects)."""
    if files.is_gcs(save_dir):
        try:
            return files.remote_dir_exists(save_dir)
        except files.FileFetchError as error:
            raise ValueError(f"run.save_dir {save_dir}: {error}") from None
    return os.path.isdir(save_dir) and bool(os.listdir(save_dir))
