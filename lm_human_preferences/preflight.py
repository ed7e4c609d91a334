"""Checks that a run can work, made in the launching process before anything is trained or written.

A run that cannot work should stop within seconds with one line naming the hyperparameter to change, not
after a reward model was trained and saved, nor deep inside TensorFlow. `check(command, hparams, ranks)`
raises a ValueError for the first problem it finds, in this order:

1. sizes: every batch divides exactly over the ranks the run will have: PPO's batch, minibatches and
   micro-batches (`hparams.batch_sizes`), and the reward model's `batch_size` and `rollout_batch_size`
   (named `rewards.train_new_model.X` when train_policy trains its reward model first);
2. the save directory can be made: the nearest existing ancestor of `run.save_dir` is a writable directory
   (a gs:// save directory is left to the trainer, which reaches the bucket anyway);
3. models: `task.policy.initial_model` (a directory, URL or GPT-2 size) and `rewards.trained_model` hold a
   readable `hparams.json` and a checkpoint (or are Hugging Face GPT-2 directories: a GPT-2 `config.json` and
   safetensors weights, and for a reward model its exported reward head; `hf:` names are fetched then), and
   the reward model shares the policy's encoding;
4. the context budget: encode(query_prefix) + query_length + encode(query_suffix) + response_length tokens fit
   the initial model's `n_ctx`, and the bare query + response (the reward model reads no prefix or suffix)
   fit a saved reward model's `n_ctx`;
5. files: label files (`labels.source`) exist, and a local one is JSON holding a list of at least
   `labels.num_train + labels.num_valid` records (not looked at when `labels.online` collects the labels); a
   human-judged online run finds the labeling web app and its instructions file; `task.query_source` exists.

Remote files are checked where they are: a HEAD request or object lookup for label files, query sources and
checkpoint state files; a remote model's `hparams.json` (a few hundred bytes) is fetched into the download
cache, where training reads it. A file that cannot be fetched (offline) is an error naming the hyperparameter,
the URL and the cache path to fill. Nothing else is written: the save directory is not made.

`dry_run=True` (`--dry_run`) keeps it fast and offline: only the sizes, and the context budget of models whose
shape is on this machine (built-in models, local model directories). Paths are not checked, since a dry run
may be made on another machine than the run.
"""

import os
from typing import List, Optional, Tuple

from lm_human_preferences.hparams import batch_sizes
from lm_human_preferences.utils import files, mpi

# What to do when a remote file cannot be fetched here (README: "to work offline with released files").
OFFLINE_HINT = ("to run offline, copy the file into the cache path named there (or point $LMHP_CACHE_DIR at a "
                "cache holding it)")

SAVED_REWARD_MODEL = ("a saved reward model: SAVE_DIR/reward_model of a train_reward run, holding hparams.json "
                      "and checkpoints/checkpoint (local path, https:// or gs:// URL), or a reward model exported "
                      "by ./launch.py export (a local directory or hf:OWNER/NAME)")
MODEL_DIRECTORY = ("a built-in model (test, demo), a GPT-2 size (124M, 355M, 774M, 1558M), or a directory or URL "
                   "holding hparams.json and a checkpoint, or a Hugging Face GPT-2 directory (config.json, "
                   "model.safetensors) or hf:OWNER/NAME[@REVISION]")
# A remote query source whose name ends so names a file (the dataset readers decide alike); other URLs are
# directories, which HTTP cannot answer for: the dataset reader checks the files in them.
QUERY_FILE_SUFFIXES = (".json", ".jsonl", ".txt")


def check(command: str, hparams, ranks: int, *, dry_run: bool = False):
    """Raise a ValueError naming the hyperparameter if the `command` run of `hparams` on `ranks` MPI ranks cannot
    work; see the module docstring for what is checked, and what a dry run leaves out."""
    check_sizes(command, hparams, ranks)
    if dry_run:
        check_models(command, hparams, network=False)
        return
    check_save_dir(hparams.run.save_dir)
    check_models(command, hparams, network=True)
    reward, reward_prefix = reward_training(command, hparams)
    online = hparams.labels.online if command == "train_policy" else None
    if reward is not None and online is None:  # online, the run collects the reward model's labels itself
        check_label_source(reward.labels, f"{reward_prefix}labels.")
    if online is not None:
        check_online_labels(online)
    check_query_source(hparams.task.query_source)


def reward_training(command: str, hparams) -> tuple:
    """(hyperparameters of the reward model this command trains, their dotted prefix); the hyperparameters are
    None when it trains none (train_policy with a saved reward model)."""
    if command == "train_reward":
        return hparams, ""
    if command == "train_policy":
        return hparams.rewards.train_new_model, "rewards.train_new_model."
    raise ValueError(f"unknown command {command!r}; known commands: train_reward, train_policy")


# ----- 1. sizes ------------------------------------------------------------------------------------------------

def check_sizes(command: str, hparams, ranks: int):
    """Every exact division the trainers make with the number of ranks (cheap, no files)."""
    if command == "train_policy":
        batch_sizes(hparams.ppo, ranks)
    reward, prefix = reward_training(command, hparams)
    if reward is not None:
        mpi.exact_div(reward.batch_size, ranks, f"{prefix}batch_size")
        mpi.exact_div(reward.rollout_batch_size, ranks, f"{prefix}rollout_batch_size")


# ----- 2. the save directory -----------------------------------------------------------------------------------

def check_save_dir(save_dir: Optional[str]):
    """The run can make `save_dir`: the nearest existing ancestor is a writable directory. Creates nothing."""
    if save_dir is None or files.is_remote(save_dir):
        return
    path = os.path.abspath(os.path.expanduser(save_dir))
    existing = path
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    where = "it" if existing == path else existing
    if not os.path.isdir(existing):
        raise ValueError(f"run.save_dir (--save_dir) {save_dir!r} cannot be made: {where} is not a directory; "
                         f"expected a directory path that can be created, or a gs://BUCKET/PATH URL")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"run.save_dir (--save_dir) {save_dir!r} cannot be written: {where} is not writable by "
                         f"this user; choose another --save_dir")


# ----- 3 and 4. models and the context budget --------------------------------------------------------------------

def check_models(command: str, hparams, *, network: bool):
    """The initial model (and a saved reward model) can be loaded, and the task's tokens fit their contexts.
    Without `network`, only models whose shape is on this machine are looked at, and their checkpoints not."""
    task = hparams.task
    policy_model = load_model("task.policy.initial_model", task.policy.initial_model, saved_reward_model=False,
                              network=network)
    if policy_model is not None:
        # The policy reads prefix + query + suffix and samples the response after them; a reward model trained
        # here is the same model, reading fewer tokens (no prefix or suffix).
        parts = [*_affix_tokens("task.query_prefix", task.query_prefix, policy_model),
                 (f"task.query_length {task.query_length}", task.query_length),
                 *_affix_tokens("task.query_suffix", task.query_suffix, policy_model),
                 (f"task.response_length {task.response_length}", task.response_length)]
        check_context(parts, policy_model, f"the initial model {task.policy.initial_model!r}")
    if command != "train_policy" or hparams.rewards.trained_model is None:
        return
    path = hparams.rewards.trained_model
    reward_model = load_model("rewards.trained_model", path, saved_reward_model=True, network=network)
    if reward_model is None:
        return
    if policy_model is not None and reward_model.encoding.name != policy_model.encoding.name:
        raise ValueError(f"rewards.trained_model {path!r} reads the {reward_model.encoding.name!r} encoding, but "
                         f"task.policy.initial_model {task.policy.initial_model!r} writes the "
                         f"{policy_model.encoding.name!r} encoding; use a reward model trained from the same "
                         f"initial model")
    parts = [(f"task.query_length {task.query_length}", task.query_length),
             (f"task.response_length {task.response_length}", task.response_length)]
    check_context(parts, reward_model, f"the reward model rewards.trained_model {path!r}",
                  note=" (it reads the query without task.query_prefix and task.query_suffix)")


def check_context(parts: List[Tuple[str, int]], model, what: str, note: str = ""):
    """The tokens `parts` ((description, count), ...) fit `model`'s context n_ctx."""
    total, n_ctx = sum(count for _, count in parts), model.hparams().n_ctx
    if total > n_ctx:
        raise ValueError(f"{' + '.join(description for description, _ in parts)} = {total} tokens exceed the "
                         f"context of {n_ctx} tokens of {what} (n_ctx){note}; lower task.response_length or "
                         f"task.query_length, or use a model with a longer context")


def _affix_tokens(name: str, text: str, model) -> List[Tuple[str, int]]:
    """[(description, token count)] of a query prefix or suffix; [] when it is empty."""
    if not text:
        return []
    try:
        count = len(model.encoding.get_encoder().encode(text))
    except files.FileFetchError as error:
        raise ValueError(f"{name}: cannot load the {model.encoding.name!r} encoding to count its tokens: {error}; "
                         f"{OFFLINE_HINT}") from None
    return [(f"{name} ({count} tokens)", count)]


def load_model(name: str, location: str, *, saved_reward_model: bool, network: bool):
    """The TrainedModel the hyperparameter `name` gives as `location`, its hparams read and, with `network`, its
    checkpoint found; None without `network` when its shape is not on this machine."""
    from lm_human_preferences.language import trained_models  # imports TensorFlow
    expected = SAVED_REWARD_MODEL if saved_reward_model else MODEL_DIRECTORY
    if location is None:
        raise ValueError(f"{name} is not set; expected {expected}")
    hf = trained_models.hf
    builtin = not saved_reward_model and location in trained_models.BUILTIN_MODELS
    remote = files.is_remote(location) or hf.is_hub_name(location) or \
        (not saved_reward_model and location in trained_models.GPT2_SIZES)
    if not builtin and not remote:
        directory = os.path.expanduser(location)
        if not os.path.isdir(directory):
            if not network:
                return None
            problem = "is not a directory" if os.path.exists(directory) else "does not exist"
            raise ValueError(f"{name} {location!r} {problem}; expected {expected}")
        if not os.path.isfile(os.path.join(directory, "hparams.json")) and not hf.is_model_dir(directory):
            raise ValueError(f"{name} {location!r} has no hparams.json; expected {expected}")
    elif remote and not network:
        return None
    try:
        if saved_reward_model:
            model = trained_models.TrainedModel("reward_model", savedir=location, scope="reward_model")
        else:
            model = trained_models.TrainedModel(location)
        model.hparams()
        if model.is_huggingface:
            _check_huggingface_files(model, saved_reward_model)
        elif network and not model.is_random:
            _check_checkpoint(name, location, model, expected)
    except files.MissingFiles as error:  # lists every file of the model to copy into the cache
        raise ValueError(f"{name} {location!r}: {error}") from None
    except files.FileFetchError as error:
        raise ValueError(f"{name} {location!r}: {error}; {OFFLINE_HINT}") from None
    except OSError as error:  # a local file that cannot be read
        raise ValueError(f"{name} {location!r} cannot be read: {error}") from None
    except ValueError as error:  # a malformed hparams.json, encoding or checkpoint state file
        raise ValueError(f"{name} {location!r}: {error}") from None
    return model


def _check_huggingface_files(model, saved_reward_model: bool):
    """A Hugging Face directory has safetensors weights, and a reward model its exported reward head."""
    from lm_human_preferences.language import hf
    hf.weight_files(model.savedir)
    if saved_reward_model:
        for filename in (hf.REWARD_HEAD, hf.REWARD_HEAD_JSON):
            if not os.path.isfile(os.path.join(model.savedir, filename)):
                raise ValueError(f"{model.savedir} has no {filename}: a Hugging Face model is a reward model only "
                                 f"as `./launch.py export SAVE_DIR OUT_DIR --scope reward_model` writes it")


def _check_checkpoint(name: str, location: str, model, expected: str):
    """A checkpoint state file `checkpoint` next to hparams.json (GPT-2) or in checkpoints/ (saved runs); a local
    one must name an existing checkpoint. A remote checkpoint is not fetched here (hundreds of megabytes)."""
    places = [model.savedir, files.join(model.savedir, "checkpoints")]
    found, first_error = False, None
    for directory in places:
        try:
            if files.exists(files.join(directory, "checkpoint")):
                found = True
                break
        except files.FileFetchError as error:  # as the trainer: the other place may still be in the cache
            first_error = first_error or error
    if not found:
        if first_error is not None:
            with model.fetching():  # the error lists every file of the model the cache lacks
                raise first_error
        raise ValueError(f"no TensorFlow checkpoint (state file `checkpoint`) in {' or '.join(places)}; "
                         f"expected {expected}")
    if not files.is_remote(model.savedir):
        model.checkpoint()  # local: reads the state file and checks that the checkpoint it names is there


# ----- 5. files ------------------------------------------------------------------------------------------------

def check_label_source(labels, prefix: str):
    """`labels.source` exists; a local one is a JSON list of enough records (the trainer validates each)."""
    source, name = labels.source, f"{prefix}source"
    if source is None:  # labels made by a synthetic judge
        return
    if files.is_remote(source):
        check_remote_file(name, source)
        return
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"{name} {source!r} {problem}; expected a label file: a JSON list of records "
                         f"(local path, https:// or gs:// URL)")
    try:
        records = files.read_json(path)
    except OSError as error:
        raise ValueError(f"{name} {source!r} cannot be read: {error.strerror or error}") from None
    except ValueError as error:  # not JSON, or not UTF-8
        raise ValueError(f"{name}: {error}; expected a label file: a JSON list of records") from None
    if not isinstance(records, list):
        raise ValueError(f"{name} {source!r} holds a JSON {type(records).__name__}; expected a label file: a JSON "
                         f"list of records")
    needed = labels.num_train + labels.num_valid
    if len(records) < needed:
        raise ValueError(f"{name} {source!r} holds {len(records)} labels, but {prefix}num_train + "
                         f"{prefix}num_valid = {labels.num_train} + {labels.num_valid} = {needed} are needed")


def check_online_labels(online):
    """A human-judged online run can serve its rounds: the labeling web app imports, and the instructions file
    (labels.online.instructions) is there."""
    from lm_human_preferences import online_labels
    if online.judge != online_labels.HUMAN:
        return
    online_labels.check_human_judge_available()
    if online.instructions is not None and not files.exists(online.instructions):
        raise ValueError(f"labels.online.instructions: {online.instructions} does not exist; expected a text file of "
                         f"task instructions for the labelers (or leave it unset for generic ones)")


def check_query_source(source: Optional[str]):
    """`task.query_source` exists: a local path, or a remote file. A remote directory is left to the dataset."""
    if source is None:
        return
    if files.is_remote(source):
        if source.rstrip("/").endswith(QUERY_FILE_SUFFIXES):
            check_remote_file("task.query_source", source)
        return
    if not os.path.exists(os.path.expanduser(source)):
        raise ValueError(f"task.query_source {source!r} does not exist; expected the query dataset's files: a "
                         f"local path or a URL")


def check_remote_file(name: str, url: str):
    """The file at `url` exists (asked of the server unless cached); offline is an error naming `name`."""
    try:
        found = files.exists(url)
    except files.FileFetchError as error:
        raise ValueError(f"{name}: {error}; {OFFLINE_HINT}") from None
    except ValueError as error:  # a URL that names no file
        raise ValueError(f"{name}: {error}") from None
    if not found:
        raise ValueError(f"{name} {url!r} does not exist")
