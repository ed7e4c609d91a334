"""Text written by people, turned into the tokens of a run's task: what `./launch.py score` (score.py) and
`./launch.py labels_from_text` (text_labels.py) share. Where a saved run's settings are read, how a text becomes
a query or a response of the task, the JSON Lines files both commands read, and their never-overwritten outputs.

How a text becomes tokens (the task's rules are in docs/formats.md, "Queries" and "Responses before scoring"):

* a query text is the query itself, what a decoded query shows: it is encoded as it is and right-padded with
  the padding token to `task.query_length`. The task's start_text/end_text rules, which cut dataset passages
  into queries, are not applied;
* a response text is encoded and right-padded to `task.response_length`; callers then apply the task's
  truncate_token rule (`lm_tasks.postprocess_responses`), as responses are before they are scored or shown to
  labelers;
* a text with more tokens than that is refused, naming where it came from, unless `truncate` is set: then it
  keeps its first query_length (response_length) tokens, as the task cuts a passage to query_length tokens and a
  policy samples response_length tokens. An empty text gives all padding, as the task allows.
"""

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from lm_human_preferences.utils import files

# The hyperparameter files of saved runs (docs/saved_runs.md), in the order they are looked for: a policy run that
# trained its reward model first holds both, and the reward model's own settings come first.
RUN_HPARAMS_FILES = {"train_reward": "train_reward_hparams.json", "train_policy": "train_policy_hparams.json"}


@dataclass
class SavedRun:
    """A saved run directory and its hyperparameters (train_reward.HParams or train_policy.HParams)."""
    directory: str
    command: str  # train_reward or train_policy: which hyperparameter file was read
    hparams: object

    @property
    def task(self):
        return self.hparams.task


def saved_run(directory: str) -> Optional[SavedRun]:
    """The run saved in `directory` (local, https:// or gs://), or None when it holds no run hyperparameters."""
    from lm_human_preferences import experiments
    for command, name in RUN_HPARAMS_FILES.items():
        path = files.join(directory, name)
        if files.exists(path):
            hparams = experiments.command_hparams(command).from_nested_dict(files.read_json(path), strict=False,
                                                                            where=f"{path}: ")
            return SavedRun(directory, command, hparams)
    return None


def describe_directory(path: str) -> str:
    """What a local path holds, for error messages: 'there is no such directory', 'it is empty', 'it holds a, b'."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return "there is no such directory"
    if not os.path.isdir(path):
        return "it is a file, not a directory"
    entries = sorted(os.listdir(path))
    if not entries:
        return "it is empty"
    return f"it holds {', '.join(entries[:12])}{', ...' if len(entries) > 12 else ''}"


# ----- texts -> tokens --------------------------------------------------------------------------------------------

class TaskText:
    """Query and response texts -> token arrays of one task (module docstring). `truncate_hint` says how to
    ask for truncation where the texts come from (a command-line flag, a Python argument)."""

    def __init__(self, task, encoder, *, truncate: bool = False, truncate_hint: str = "--truncate"):
        self.task = task
        self.encoder = encoder
        self.truncate = truncate
        self.truncate_hint = truncate_hint

    def query(self, text: str, where: str) -> np.ndarray:
        """[query_length]"""
        return self._fit(text, self.task.query_length, "query_length", where)

    def response(self, text: str, where: str) -> np.ndarray:
        """[response_length], before the task's truncate_token rule."""
        return self._fit(text, self.task.response_length, "response_length", where)

    def _fit(self, text: str, length: int, setting: str, where: str) -> np.ndarray:
        tokens = self.encoder.encode(text)
        if len(tokens) > length:
            if not self.truncate:
                raise ValueError(f"{where}: the text is {len(tokens)} tokens, more than the run's task.{setting} "
                                 f"of {length}; shorten it, or keep its first {length} tokens with "
                                 f"{self.truncate_hint}")
            tokens = tokens[:length]
        padded = np.full(length, self.encoder.padding_token, np.int32)
        padded[:len(tokens)] = tokens
        return padded


# ----- JSON Lines input -------------------------------------------------------------------------------------------

def read_jsonl(path: str) -> List[Tuple[str, dict]]:
    """The records of a JSON Lines file (one JSON object a line; blank lines are skipped), each with where it
    is, "PATH:LINE". Errors name the file and line."""
    try:
        text = files.read_text(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (expected a JSON Lines file: one JSON object a line)") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a JSON Lines file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line is one "
                             f"JSON object") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append((where, record))
    if not records:
        raise ValueError(f"{path}: the file holds no records (expected one JSON object a line)")
    return records


def text_field(record: dict, name: str, where: str, fields: Sequence[str]) -> str:
    """record[name], which must be a text; `fields` are what such records hold (for the error message)."""
    if name not in record:
        raise ValueError(f"{where}: field {name!r} is missing (records have {', '.join(fields)})")
    return text_value(record[name], f"{where}, field {name!r}")


def text_value(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a text (a JSON string), got {json.dumps(value)[:60]}")
    return value


# ----- outputs ----------------------------------------------------------------------------------------------------

def check_new_output(path: str, what: str) -> str:
    """A local path where nothing exists yet (outputs are never overwritten); `what` names it (a flag)."""
    path = os.fspath(path)
    if not path or files.is_remote(path):
        raise ValueError(f"{what} {path!r}: expected a local file path (write locally, then upload)")
    if os.path.lexists(os.path.expanduser(path)):
        raise ValueError(f"{what} {path} exists, and an output is never overwritten: choose a new file name, or "
                         f"remove it first")
    return path


def write_new_output(path: str, text: str, what: str):
    """Write `text` atomically to the new file `path` (a file made there meanwhile is not overwritten either)."""
    try:
        files.write_new_text_atomic(path, text)
    except FileExistsError:
        check_new_output(path, what)  # says it exists
        raise
