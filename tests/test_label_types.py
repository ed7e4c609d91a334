"""Label types (docs/formats.md, label files): schemas, losses against numpy references, and validation of
label files."""
import json

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import label_types
from lm_human_preferences.language import encodings

TEST = encodings.get("test")  # ids 0..26, padding 27
QUERY_LENGTH, RESPONSE_LENGTH = 5, 3


# ----- registry and schemas ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, num_samples, sample_fields", [
    ("best_of_2", 2, ["sample0", "sample1"]),
    ("best_of_4", 4, ["sample0", "sample1", "sample2", "sample3"]),
    ("best_of_11", 11, [f"sample{i}" for i in range(11)]),
    ("scalar_rating", 1, ["sample"]),
    ("scalar_compare", 2, ["sample0", "sample1"]),
])
def test_label_types(name, num_samples, sample_fields):
    label_type = label_types.get(name)
    assert (label_type.name, label_type.num_samples, label_type.sample_fields()) == (name, num_samples, sample_fields)


@pytest.mark.parametrize("name", ["best_of_1", "best_of_0", "best_of_x", "best_of_", "ranking", ""])
def test_unknown_label_types_list_the_known_ones(name):
    with pytest.raises(ValueError, match=r"unknown label type .*accepted: best_of_N \(N >= 2, e.g. best_of_4\), "
                                         r"scalar_rating, scalar_compare"):
        label_types.get(name)


def test_schemas():
    assert label_types.get("best_of_3").label_schemas(7, 4) == {
        "query": (tf.int32, (7,)), "sample0": (tf.int32, (4,)), "sample1": (tf.int32, (4,)),
        "sample2": (tf.int32, (4,)), "best": (tf.int32, ())}
    assert label_types.get("scalar_rating").label_schemas(7, 4) == {
        "query": (tf.int32, (7,)), "sample": (tf.int32, (4,)), "score": (tf.float32, ())}
    assert label_types.get("scalar_compare").label_schemas(7, 4) == {
        "query": (tf.int32, (7,)), "sample0": (tf.int32, (4,)), "sample1": (tf.int32, (4,)),
        "difference": (tf.float32, ())}


def test_target_scales():
    labels = {"score": np.array([1.0, 3.0]), "difference": np.array([2.0, -4.0]), "best": np.array([0, 1])}
    assert label_types.get("best_of_4").target_scales(labels) is None  # rewards normalised to mean 0, std 1
    np.testing.assert_array_equal(label_types.get("scalar_rating").target_scales(labels), [1.0, 3.0])
    np.testing.assert_array_equal(label_types.get("scalar_compare").target_scales(labels), [1.0, -2.0])


# ----- losses ------------------------------------------------------------------------------------------------

WEIGHTS = np.linspace(-1.0, 1.0, RESPONSE_LENGTH * 28).reshape(RESPONSE_LENGTH, 28).astype(np.float32)


def reward_fn(queries, responses):
    """A fixed reward: a per-position table of token values plus a small query term. [b]"""
    one_hot = tf.one_hot(responses, 28)  # [b, response_length, 28]
    return tf.reduce_sum(one_hot * WEIGHTS, axis=[1, 2]) + 0.01 * tf.reduce_sum(tf.cast(queries, tf.float32), 1)


def reference_rewards(queries, responses):
    return WEIGHTS[np.arange(RESPONSE_LENGTH), responses].sum(axis=1) + 0.01 * queries.sum(axis=1)


def random_labels(label_type, batch, rng):
    labels = {"query": rng.randint(0, 28, (batch, QUERY_LENGTH)).astype(np.int32)}
    for name in label_type.sample_fields():
        labels[name] = rng.randint(0, 28, (batch, RESPONSE_LENGTH)).astype(np.int32)
    for name, kind in label_type.label_fields().items():
        labels[name] = (rng.randint(0, label_type.num_samples, batch).astype(np.int32) if kind == "index"
                        else rng.randn(batch).astype(np.float32))
    return labels


def evaluate_loss(label_type, labels):
    with tf.Session() as sess:
        loss, metrics = label_type.loss(reward_fn, {k: tf.constant(v) for k, v in labels.items()})
        return sess.run((loss, metrics))


def test_best_of_n_loss_is_softmax_cross_entropy_against_best():
    label_type = label_types.get("best_of_4")
    labels = random_labels(label_type, 64, np.random.RandomState(0))
    loss, metrics = evaluate_loss(label_type, labels)
    logits = np.stack([reference_rewards(labels["query"], labels[f"sample{i}"]) for i in range(4)], axis=1)
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    np.testing.assert_allclose(loss, -log_softmax[np.arange(64), labels["best"]].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(1) == labels["best"]).mean())
    assert 0 < metrics["accuracy"] < 1


def test_scalar_rating_loss_is_squared_error():
    label_type = label_types.get("scalar_rating")
    labels = random_labels(label_type, 32, np.random.RandomState(1))
    loss, metrics = evaluate_loss(label_type, labels)
    expected = ((reference_rewards(labels["query"], labels["sample"]) - labels["score"]) ** 2).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["error"], expected, rtol=1e-5)
    # the 2019 statistics of the labels and of the predictions' agreement with them
    predicted = reference_rewards(labels["query"], labels["sample"])
    np.testing.assert_allclose(metrics["label_mean"], labels["score"].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["label_var"], labels["score"].var(), rtol=1e-4)
    np.testing.assert_allclose(metrics["corr"], np.corrcoef(labels["score"], predicted)[0, 1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["best_of_4", "scalar_compare"])
def test_every_label_type_reports_the_2019_error_metric(name):
    label_type = label_types.get(name)
    labels = random_labels(label_type, 16, np.random.RandomState(3))
    loss, metrics = evaluate_loss(label_type, labels)
    np.testing.assert_allclose(metrics["error"], loss)  # 2019 logged the loss a second time as `error`


def test_scalar_compare_loss_is_squared_error_of_the_reward_difference():
    label_type = label_types.get("scalar_compare")
    labels = random_labels(label_type, 32, np.random.RandomState(2))
    labels["difference"][:4] = 0.0  # ties do not count for the sign agreement
    loss, metrics = evaluate_loss(label_type, labels)
    predicted = reference_rewards(labels["query"], labels["sample1"]) - reference_rewards(labels["query"],
                                                                                          labels["sample0"])
    np.testing.assert_allclose(loss, ((predicted - labels["difference"]) ** 2).mean(), rtol=1e-5)
    decided = labels["difference"] != 0
    agree = np.sign(predicted[decided]) == np.sign(labels["difference"][decided])
    np.testing.assert_allclose(metrics["accuracy"], agree.mean(), rtol=1e-6)


# ----- label files -------------------------------------------------------------------------------------------

def good_record(label_type, index=0):
    record = {"query": [index % 27] * QUERY_LENGTH}
    for i, name in enumerate(label_type.sample_fields()):
        record[name] = [(index + i) % 27, 27, 27]  # padded responses are valid
    for name, kind in label_type.label_fields().items():
        record[name] = index % label_type.num_samples if kind == "index" else 0.5 * index - 1
    return record


def write_labels(tmp_path, records):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(records))
    return str(path)


def load(path, name="best_of_4", encoding=TEST):
    return label_types.load_labels(path, label_types.get(name), query_length=QUERY_LENGTH,
                                   response_length=RESPONSE_LENGTH, encoding=encoding)


@pytest.mark.parametrize("name", ["best_of_4", "scalar_rating", "scalar_compare"])
def test_a_good_file_loads_as_arrays(tmp_path, name):
    label_type = label_types.get(name)
    records = [good_record(label_type, i) for i in range(6)]
    records[2]["comment"] = "extra fields are allowed"
    labels = load(write_labels(tmp_path, records), name)
    assert set(labels) == {"query", *label_type.sample_fields(), *label_type.label_fields()}
    assert labels["query"].shape == (6, QUERY_LENGTH) and labels["query"].dtype == np.int32
    for field in label_type.sample_fields():
        assert labels[field].shape == (6, RESPONSE_LENGTH) and labels[field].dtype == np.int32
        assert labels[field].tolist() == [r[field] for r in records]
    for field, kind in label_type.label_fields().items():
        assert labels[field].dtype == (np.int32 if kind == "index" else np.float32)
        np.testing.assert_allclose(labels[field], [r[field] for r in records])


def corrupt(field, value):
    def change(record):
        record[field] = value
    return change


BAD_RECORDS = [
    ("best_of_4", lambda r: r.pop("sample2"), r"record 3: field 'sample2' is missing \(best_of_4 records have "
                                              r"query, sample0, sample1, sample2, sample3, best\)"),
    ("best_of_4", lambda r: r.pop("best"), r"record 3: field 'best' is missing"),
    ("best_of_4", corrupt("query", [1, 2, 3]), r"record 3, field 'query': expected 5 token ids, got 3"),
    ("best_of_4", corrupt("sample1", [1, 2, 3, 4]), r"record 3, field 'sample1': expected 3 token ids, got 4"),
    ("best_of_4", corrupt("sample0", "abc"), r"record 3, field 'sample0': expected a list of 3 token ids, got str"),
    ("best_of_4", corrupt("sample0", [1, 2.5, 3]), r"record 3, field 'sample0'\[1\]: token ids are integers, "
                                                   r"got 2.5"),
    ("best_of_4", corrupt("sample0", [1, True, 3]), r"record 3, field 'sample0'\[1\]: token ids are integers"),
    ("best_of_4", corrupt("query", [0, 0, 0, 0, 28]), r"record 3, field 'query'\[4\]: token id 28 is out of range "
                                                      r"\(valid ids of encoding 'test': 0\.\.26, or the padding "
                                                      r"token 27\)"),
    ("best_of_4", corrupt("sample3", [-1, 0, 0]), r"record 3, field 'sample3'\[0\]: token id -1 is out of range"),
    ("best_of_4", corrupt("best", 4), r"record 3, field 'best': 4 is out of range \[0, 4\)"),
    ("best_of_4", corrupt("best", -1), r"record 3, field 'best': -1 is out of range \[0, 4\)"),
    ("best_of_4", corrupt("best", 1.0), r"record 3, field 'best': expected an integer index in \[0, 4\), got 1.0"),
    ("best_of_4", corrupt("best", "1"), r"record 3, field 'best': expected an integer index"),
    ("best_of_4", corrupt("best", True), r"record 3, field 'best': expected an integer index"),
    ("scalar_rating", corrupt("score", "high"), r"record 3, field 'score': expected a finite number, got 'high'"),
    ("scalar_rating", corrupt("score", None), r"record 3, field 'score': expected a finite number, got None"),
    ("scalar_rating", corrupt("score", float("nan")), r"record 3, field 'score': expected a finite number, got nan"),
    ("scalar_rating", corrupt("score", float("inf")), r"record 3, field 'score': expected a finite number, got inf"),
    ("scalar_rating", corrupt("score", True), r"record 3, field 'score': expected a finite number, got True"),
    ("scalar_compare", corrupt("difference", [1.0]), r"record 3, field 'difference': expected a finite number"),
    ("scalar_compare", corrupt("difference", float("nan")), r"record 3, field 'difference': expected a finite "
                                                            r"number, got nan"),
    ("scalar_compare", corrupt("difference", "0.5"), r"record 3, field 'difference': expected a finite number"),
    ("scalar_rating", corrupt("sample", {"0": 1}), r"record 3, field 'sample': expected a list of 3 token ids, "
                                                   r"got dict"),
    ("scalar_rating", corrupt("query", None), r"record 3, field 'query': expected a list of 5 token ids, got None"),
    ("scalar_rating", lambda r: r.pop("score"), r"record 3: field 'score' is missing \(scalar_rating records have "
                                                r"query, sample, score\)"),
    ("best_of_4", corrupt("sample2", [0, "1", 0]), r"record 3, field 'sample2'\[1\]: token ids are integers, "
                                                   r"got '1'"),
    ("scalar_compare", lambda r: r.pop("sample1"), r"record 3: field 'sample1' is missing"),
]


@pytest.mark.parametrize("name, change, message", BAD_RECORDS)
def test_a_bad_record_is_rejected_naming_file_record_and_field(tmp_path, name, change, message):
    label_type = label_types.get(name)
    records = [good_record(label_type, i) for i in range(6)]
    change(records[3])
    path = write_labels(tmp_path, records)
    with pytest.raises(label_types.LabelFileError, match=message) as error:
        load(path, name)
    assert str(error.value).startswith(f"{path}, record 3")
    assert isinstance(error.value, ValueError)


def test_a_record_that_is_not_an_object(tmp_path):
    path = write_labels(tmp_path, [good_record(label_types.get("best_of_4")), [1, 2]])
    with pytest.raises(label_types.LabelFileError, match=r"labels.json, record 1: expected a JSON object, got list"):
        load(path)


@pytest.mark.parametrize("content, message", [
    ('{"query": []}', r"labels.json: a label file is a JSON list of records, got dict"),
    ("[]", r"labels.json: the label file holds no records"),
    ("[{,", r"labels.json: not valid JSON"),
    ("", r"labels.json: the label file is empty; expected a JSON list of records"),
    ("\n  \n", r"labels.json: the label file is empty"),
    ('"best_of_4"', r"labels.json: a label file is a JSON list of records, got str"),
])
def test_files_that_are_not_label_lists(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_text(content)
    with pytest.raises(label_types.LabelFileError, match=message):
        load(str(path))


def test_a_missing_file(tmp_path):
    with pytest.raises(label_types.LabelFileError, match=r"nowhere.json: label file not found"):
        load(str(tmp_path / "nowhere.json"))


def test_main_encoding_token_range(tmp_path):
    label_type = label_types.get("best_of_2")
    record = {"query": [0, 50256, 50259, 50259, 50259], "sample0": [13, 50259, 50259], "sample1": [1, 2, 3],
              "best": 1}
    main = encodings.get("main")
    assert load(write_labels(tmp_path, [record]), "best_of_2", main)["query"].tolist() == [record["query"]]
    record["sample1"] = [1, 50257, 3]  # between the vocabulary and the padding token
    with pytest.raises(label_types.LabelFileError, match=r"record 0, field 'sample1'\[1\]: token id 50257 is out "
                                                         r"of range \(valid ids of encoding 'main': 0\.\.50256, or "
                                                         r"the padding token 50259\)"):
        label_types.load_labels(write_labels(tmp_path, [record]), label_type, query_length=QUERY_LENGTH,
                                response_length=RESPONSE_LENGTH, encoding=main)
