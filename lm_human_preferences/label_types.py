"""Kinds of human labels: their record schemas, validation, losses and target scales.

* `best_of_N` (e.g. `best_of_4`): `query`, `sample0..sample{N-1}`, `best` in [0, N); softmax cross-entropy
  of the N rewards against `best`.
* `scalar_rating`: `query`, `sample`, `score`; squared error of the reward against the score.
* `scalar_compare`: `query`, `sample0`, `sample1`, `difference`; squared error of r1 − r0 against it.

A synthetic judge's scores of a record's samples become its label through `LabelType.judge_label`, with the
judge's noise (labeler.py). A label file is a JSON list of such records (the released format). `load_labels`
validates every record before training starts and names the file, the record index and the field of the first
bad one.
The formats and the released label sets are described in docs/formats.md.
"""

import abc
import json
import math
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from lm_human_preferences.utils import files


class LabelFileError(ValueError):
    """A label file that cannot be used; the message names the file, record index and field."""


class LabelType(abc.ABC):
    name: str
    family: str  # the name of its kind in messages: best_of_N, scalar_rating, scalar_compare
    num_samples: int  # responses per record

    @abc.abstractmethod
    def sample_fields(self) -> List[str]:
        """The response fields of a record."""

    @abc.abstractmethod
    def label_fields(self) -> Dict[str, str]:
        """The answer fields and their kind: 'index' (best) or 'float'."""

    def label_schemas(self, query_length: int, response_length: int) -> Dict[str, Tuple[object, Tuple[int, ...]]]:
        """{field: (tf dtype, shape)} of one record."""
        import tensorflow.compat.v1 as tf
        schemas = {"query": (tf.int32, (query_length,))}
        schemas.update({name: (tf.int32, (response_length,)) for name in self.sample_fields()})
        schemas.update({name: (tf.int32 if kind == "index" else tf.float32, ())
                        for name, kind in self.label_fields().items()})
        return schemas

    def target_scales(self, labels: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
        """The values whose mean/std the rewards are normalised to before training (None: mean 0, std 1)."""
        return None

    def target_mean_std(self, labels: Dict[str, np.ndarray]) -> Tuple[float, float]:
        """The mean and standard deviation the rewards are normalised to before training, given the labels."""
        scales = self.target_scales(labels)
        return (0.0, 1.0) if scales is None else (float(np.mean(scales)), float(np.std(scales)))

    @abc.abstractmethod
    def judge_label(self, scores: np.ndarray, temperature: float, rng: np.random.RandomState) -> dict:
        """The label fields of a record whose samples a judge scored `scores` [num_samples], with its noise
        `temperature` in score units (0: exact); `rng` draws the noise."""

    @abc.abstractmethod
    def loss(self, reward_fn, labels):
        """(loss, metrics) for a batch of label tensors; reward_fn(queries, responses) -> rewards [b].
        The metrics hold what 2019 logged under train_reward/minibatch/ (`error`, which equals the loss, and
        for scalar_rating `label_mean`, `label_var`, `corr`), plus our `accuracy` where a label has a winner."""


def choose(scores, temperature: float, rng: np.random.RandomState) -> int:
    """A judge's pick among samples with these scores: at temperature 0 the best (ties at random, so that equal
    samples show no position bias), else a draw from softmax(scores / temperature), as a human who sometimes
    picks a worse sample."""
    scores = np.asarray(scores, np.float64)
    if temperature < 0:
        raise ValueError(f"the judge's temperature must be >= 0 (0 = always its best), got {temperature}")
    if temperature == 0:
        return int(rng.choice(np.flatnonzero(scores == scores.max())))
    logits = (scores - scores.max()) / temperature  # shifted so that exp cannot overflow
    probabilities = np.exp(logits) / np.exp(logits).sum()
    return int(rng.choice(len(scores), p=probabilities))


class BestOfN(LabelType):
    family = "best_of_N"

    def __init__(self, n: int):
        self.num_samples = n
        self.name = f"best_of_{n}"

    def sample_fields(self):
        return [f"sample{i}" for i in range(self.num_samples)]

    def label_fields(self):
        return {"best": "index"}

    def judge_label(self, scores, temperature, rng):
        return {"best": choose(scores, temperature, rng)}

    def loss(self, reward_fn, labels):
        import tensorflow.compat.v1 as tf
        logits = tf.stack([reward_fn(labels["query"], labels[name]) for name in self.sample_fields()], axis=1)  # [b, N]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels["best"], logits=logits))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels["best"]),
                                          tf.float32))
        return loss, {"error": loss, "accuracy": accuracy}


class ScalarRating(LabelType):
    name = family = "scalar_rating"
    num_samples = 1

    def sample_fields(self):
        return ["sample"]

    def label_fields(self):
        return {"score": "float"}

    def judge_label(self, scores, temperature, rng):
        return {"score": float(scores[0] + temperature * rng.standard_normal())}  # Gaussian noise

    def target_scales(self, labels):
        return labels["score"]

    def loss(self, reward_fn, labels):
        import tensorflow.compat.v1 as tf
        predicted = reward_fn(labels["query"], labels["sample"])  # [b]
        scores = labels["score"]  # [b]
        loss = tf.reduce_mean(tf.square(predicted - scores))
        label_mean, label_var = tf.nn.moments(scores, axes=[0])
        predicted_mean, predicted_var = tf.nn.moments(predicted, axes=[0])
        covariance = tf.reduce_mean((scores - label_mean) * (predicted - predicted_mean))
        corr = covariance / tf.sqrt(tf.maximum(label_var * predicted_var, 1e-16))  # Pearson's r of the batch
        return loss, {"error": loss, "label_mean": label_mean, "label_var": label_var, "corr": corr}


class ScalarCompare(LabelType):
    name = family = "scalar_compare"
    num_samples = 2

    def sample_fields(self):
        return ["sample0", "sample1"]

    def label_fields(self):
        return {"difference": "float"}

    def judge_label(self, scores, temperature, rng):
        return {"difference": float(scores[1] - scores[0] + temperature * rng.standard_normal())}  # r1 - r0

    def target_scales(self, labels):
        # r1 - r0 should match the difference, so each reward carries about half of it (2019 behaviour)
        return labels["difference"] / 2

    def loss(self, reward_fn, labels):
        import tensorflow.compat.v1 as tf
        predicted = reward_fn(labels["query"], labels["sample1"]) - reward_fn(labels["query"], labels["sample0"])
        loss = tf.reduce_mean(tf.square(predicted - labels["difference"]))
        decided = tf.cast(tf.not_equal(labels["difference"], 0), tf.float32)
        agree = tf.cast(predicted * labels["difference"] > 0, tf.float32) * decided
        accuracy = tf.reduce_sum(agree) / tf.maximum(tf.reduce_sum(decided), 1.0)  # sign agreement
        return loss, {"error": loss, "accuracy": accuracy}


ACCEPTED = "best_of_N (N >= 2, e.g. best_of_4), scalar_rating, scalar_compare"  # the names `get` takes


def get(name: str) -> LabelType:
    match = re.fullmatch(r"best_of_(\d+)", name or "")
    if match and int(match.group(1)) >= 2:
        return BestOfN(int(match.group(1)))
    if name == "scalar_rating":
        return ScalarRating()
    if name == "scalar_compare":
        return ScalarCompare()
    raise ValueError(f"unknown label type {name!r}; accepted: {ACCEPTED}")


# ----- label files -----------------------------------------------------------------------------------------------

def _tokens(value, length: int, where: str, encoding) -> list:
    """A list of `length` token ids of the encoding (0..n_vocab-1, or its padding token)."""
    if not isinstance(value, list):
        raise LabelFileError(f"{where}: expected a list of {length} token ids, got {type(value).__name__}")
    if len(value) != length:
        raise LabelFileError(f"{where}: expected {length} token ids, got {len(value)}")
    for position, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int):
            raise LabelFileError(f"{where}[{position}]: token ids are integers, got {token!r}")
        if not (0 <= token < encoding.n_vocab or token == encoding.padding_token):
            raise LabelFileError(f"{where}[{position}]: token id {token} is out of range (valid ids of encoding "
                                 f"{encoding.name!r}: 0..{encoding.n_vocab - 1}, or the padding token "
                                 f"{encoding.padding_token})")
    return value


def _label_value(value, kind: str, where: str, label_type: "LabelType"):
    """`best` (kind 'index'): an integer in [0, N); scores and differences (kind 'float'): finite numbers."""
    if kind == "index":
        if isinstance(value, bool) or not isinstance(value, int):
            raise LabelFileError(f"{where}: expected an integer index in [0, {label_type.num_samples}), "
                                 f"got {value!r}")
        if not 0 <= value < label_type.num_samples:
            raise LabelFileError(f"{where}: {value} is out of range [0, {label_type.num_samples})")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LabelFileError(f"{where}: expected a finite number, got {value!r}")
    return value


def validate_records(records, label_type: LabelType, *, query_length: int, response_length: int, encoding,
                     source: str, record_names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """Check every record; return {field: array [n, ...]}. Errors name the file, record index and field
    (`record_names[i]` instead of "SOURCE, record i" where given: records made from the lines of another file).
    Fields other than the label type's are allowed and ignored."""
    if not isinstance(records, list):
        raise LabelFileError(f"{source}: a label file is a JSON list of records, got {type(records).__name__}")
    if not records:
        raise LabelFileError(f"{source}: the label file holds no records")
    lengths = {"query": query_length, **{name: response_length for name in label_type.sample_fields()}}
    kinds = label_type.label_fields()
    columns = {name: [] for name in [*lengths, *kinds]}
    for index, record in enumerate(records):
        where = record_names[index] if record_names is not None else f"{source}, record {index}"
        if not isinstance(record, dict):
            raise LabelFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in columns:
            if name not in record:
                raise LabelFileError(f"{where}: field {name!r} is missing ({label_type.name} records have "
                                     f"{', '.join(columns)})")
        for name, length in lengths.items():
            columns[name].append(_tokens(record[name], length, f"{where}, field {name!r}", encoding))
        for name, kind in kinds.items():
            columns[name].append(_label_value(record[name], kind, f"{where}, field {name!r}", label_type))
    return {name: np.asarray(values, np.float32 if kinds.get(name) == "float" else np.int32)
            for name, values in columns.items()}


def load_labels(path: str, label_type: LabelType, *, query_length: int, response_length: int,
                encoding) -> Dict[str, np.ndarray]:
    """Read a label file (local, https:// or gs://) and validate every record: {field: array [n, ...]}."""
    try:
        text = files.read_text(path)
    except FileNotFoundError:
        raise LabelFileError(f"{path}: label file not found") from None
    if not text.strip():  # a download or copy that wrote nothing: say so rather than "Expecting value"
        raise LabelFileError(f"{path}: the label file is empty; expected a JSON list of records")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise LabelFileError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    return validate_records(records, label_type, query_length=query_length, response_length=response_length,
                            encoding=encoding, source=path)
