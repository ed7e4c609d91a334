"""Label files from text comparisons: `./launch.py labels_from_text SOURCE IN.jsonl OUT.json`.

Comparisons that people made outside this code (a spreadsheet, another labeling tool) become a label file in the
released token-id format (docs/formats.md, "Label files"), ready for `train_reward --labels.source OUT.json`.

SOURCE gives the settings, as `train_reward` would use them with the file: a train_reward experiment name
(`--some.hparam VALUE` overrides apply as they do for train_reward), or a saved run directory (a train_reward or
train_policy run, whose saved hyperparameters are read). From it come the task (query_length, response_length,
the truncate_token rule), the encoding (that of the task's initial model, which train_reward validates label files
with) and the label type (`labels.type`, or `--label_type`).

IN.jsonl holds one comparison a line, with the field names of the released records, texts instead of tokens:

    best_of_N        {"query": TEXT, "sample0": TEXT, ..., "sample{N-1}": TEXT, "best": INDEX in [0, N)}
    scalar_rating    {"query": TEXT, "sample": TEXT, "score": NUMBER}
    scalar_compare   {"query": TEXT, "sample0": TEXT, "sample1": TEXT, "difference": NUMBER}

The samples may instead be a list, `"samples": [TEXT, ...]`. Other fields are copied into the record unchanged
(the label loader ignores them). Texts become tokens as text_inputs.py says: padded to the task's lengths, the
samples cut by the task's truncate_token rule as labelers saw them, a text that is too long refused (or, with
--truncate, cut). Every record is then checked by the label loader's own validation, and OUT.json is written
atomically; it must not exist.
"""

import json
import os
import re
from typing import List, Optional, Tuple

import numpy as np

from lm_human_preferences import label_types, lm_tasks, text_inputs
from lm_human_preferences.utils import files

_SAMPLE_FIELD = re.compile(r"sample\d*|samples")


def resolve_source(source: str, overrides: dict) -> Tuple[str, object, Optional[str]]:
    """(a description, the task hyperparameters, the label type name or None) of SOURCE: a run directory or a
    train_reward experiment (module docstring)."""
    from lm_human_preferences import experiments

    source = str(source)
    is_path = files.is_remote(source) or os.path.exists(os.path.expanduser(source))
    run = text_inputs.saved_run(source) if is_path else None
    if is_path and run is None and source not in experiments.REWARD_EXPERIMENTS:  # ./test, no run: the experiment
        raise ValueError(f"SOURCE {source}: expected a train_reward experiment name or a run directory "
                         f"(holding train_reward_hparams.json or train_policy_hparams.json); "
                         f"{text_inputs.describe_directory(source) if not files.is_remote(source) else 'none'}")
    if run is not None:
        if overrides:
            names = ", ".join(f"--{name}" for name in sorted(overrides))
            raise ValueError(f"{names}: a saved run's settings are its own; overrides apply to an experiment")
        return f"{run.command} run {source}", run.task, _run_label_type(run)
    try:
        hparams = experiments.resolve_hparams("train_reward", source, "labels_from_text", overrides=overrides)
    except ValueError as error:
        if not str(error).startswith("unknown train_reward experiment"):
            raise
        raise ValueError(f"SOURCE {source}: no such run directory, and {error}") from None
    return f"experiment {source}", hparams.task, hparams.labels.type


def _run_label_type(run: text_inputs.SavedRun) -> Optional[str]:
    """The label type a saved run trained its reward model with, when it says."""
    if run.command == "train_reward":
        return run.hparams.labels.type
    reward_hparams = run.hparams.rewards.train_new_model
    online = run.hparams.labels.online
    if online is not None:
        return online.type or (reward_hparams.labels.type if reward_hparams is not None else None)
    return reward_hparams.labels.type if reward_hparams is not None else None


def make_record(record: dict, where: str, label_type: label_types.LabelType, texts: text_inputs.TaskText) -> dict:
    """A released-format record (tokens, samples before the truncate_token rule) from one input record; the
    label fields are copied as they are, for the label loader's validation to check."""
    sample_fields = label_type.sample_fields()
    label_fields = list(label_type.label_fields())
    fields = ["query", *sample_fields, *label_fields]
    extra_samples = [name for name in record if _SAMPLE_FIELD.fullmatch(name) and name not in sample_fields
                     and name != "samples"]
    if extra_samples:
        raise ValueError(f"{where}: field {extra_samples[0]!r} is not a sample of {label_type.name} records (they "
                         f"have {', '.join(sample_fields)}){_label_type_hint(label_type, record)}")
    if "samples" in record:
        given = [name for name in sample_fields if name in record]
        if given:
            raise ValueError(f"{where}: give the samples either as a list \"samples\" or as fields "
                             f"{', '.join(sample_fields)}, not both (found {given[0]!r} and \"samples\")")
        samples = record["samples"]
        if not isinstance(samples, list):
            raise ValueError(f"{where}, field 'samples': expected a list of {label_type.num_samples} texts, got "
                             f"{json.dumps(samples)[:60]}")
        if len(samples) != label_type.num_samples:
            raise ValueError(f"{where}, field 'samples': {len(samples)} samples, but {label_type.name} records have "
                             f"{label_type.num_samples}{_label_type_hint(label_type, record)}")
        samples = [text_inputs.text_value(text, f"{where}, field 'samples'[{i}]") for i, text in enumerate(samples)]
        sample_wheres = [f"{where}, field 'samples'[{i}]" for i in range(len(samples))]
    else:
        samples = [text_inputs.text_field(record, name, where, fields) for name in sample_fields]
        sample_wheres = [f"{where}, field {name!r}" for name in sample_fields]
    query = text_inputs.text_field(record, "query", where, fields)
    made = {"query": texts.query(query, f"{where}, field 'query'").tolist()}
    for name, text, sample_where in zip(sample_fields, samples, sample_wheres):
        made[name] = texts.response(text, sample_where).tolist()
    made.update({name: record[name] for name in label_fields if name in record})  # checked by the validator
    made.update({name: value for name, value in record.items() if name not in made and name != "samples"})
    return made


def _label_type_hint(label_type: label_types.LabelType, record: dict) -> str:
    """For best_of_N, the label type that fits the record's number of samples."""
    if not isinstance(label_type, label_types.BestOfN):
        return ""
    count = len(record["samples"]) if isinstance(record.get("samples"), list) else \
        len([name for name in record if re.fullmatch(r"sample\d+", name)])
    return f"; for {count} samples use --label_type best_of_{count}" if count >= 2 else ""


def labels_from_text(source: str, input: str, output: str, *, label_type: Optional[str] = None,
                     truncate: bool = False, **overrides) -> List[dict]:
    """Write OUTPUT, the label file of the comparisons in INPUT (module docstring); returns its records. Every
    check happens before anything is written."""
    input = text_inputs.text_value(input, "IN.jsonl")
    output = text_inputs.check_new_output(text_inputs.text_value(output, "OUT.json"), "OUT.json")
    described, task, type_name = resolve_source(source, overrides)
    if label_type is not None:
        type_name = text_inputs.text_value(label_type, "--label_type")
    if type_name is None:
        raise ValueError(f"{described} names no label type (its reward model came from elsewhere): pass "
                         f"--label_type ({label_types.ACCEPTED})")
    resolved_type = label_types.get(type_name)
    records_in = text_inputs.read_jsonl(input)
    from lm_human_preferences.language.trained_models import TrainedModel
    encoding = TrainedModel(task.policy.initial_model).encoding  # as train_reward validates label files
    texts = text_inputs.TaskText(task, encoding.get_encoder(), truncate=truncate)
    records = [make_record(record, where, resolved_type, texts) for where, record in records_in]
    cut = _apply_truncate_token(records, resolved_type, task, encoding.padding_token)
    label_types.validate_records(records, resolved_type, query_length=task.query_length,
                                 response_length=task.response_length, encoding=encoding, source=input,
                                 record_names=[where for where, _ in records_in])
    text_inputs.write_new_output(output, json.dumps(records) + "\n", "OUT.json")
    note = f"; {cut} sample{'s' if cut > 1 else ''} cut after the task's truncate_token" if cut else ""
    print(f"wrote {len(records)} {resolved_type.name} labels for {described} (query_length {task.query_length}, "
          f"response_length {task.response_length}, encoding {encoding.name}) to {output}{note}")
    return records


def _apply_truncate_token(records: List[dict], label_type: label_types.LabelType, task, padding_token: int) -> int:
    """The task's truncate_token rule on every sample, in place; returns how many samples it changed."""
    changed = 0
    for name in label_type.sample_fields():
        raw = np.array([record[name] for record in records], np.int32)  # [n, response_length]
        cut = lm_tasks.postprocess_responses(raw, task, padding_token)
        changed += int(np.sum(np.any(cut != raw, axis=1)))
        for record, tokens in zip(records, cut):
            record[name] = tokens.tolist()
    return changed
