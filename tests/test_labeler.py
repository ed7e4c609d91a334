"""The synthetic labeler: judges, the noisy choice, records in exactly the released format, the label file."""

import json
import os

import numpy as np
import pytest

from lm_human_preferences import label_types, labeler
from lm_human_preferences.language import encodings

ENCODING = encodings.get("test")  # one token per character of "abcdefghijklmnopqrstuvwxyz."; padding 27
ENCODER = ENCODING.get_encoder()
QUERY_LENGTH, RESPONSE_LENGTH = 5, 6


def tokens(text):
    return ENCODER.encode(text)


# ----- judges -----------------------------------------------------------------------------------------------------

def test_letter_density_counts_the_letter_in_the_response_only():
    judge = labeler.get_judge("letter_e")
    assert judge("eeee", "seen") == 0.5
    assert judge("", "EeXe") == 0.75  # either case
    assert judge("eee", "") == 0.0
    assert labeler.get_judge("letter_z")("", "zzz.") == 0.75


def test_vowel_density():
    judge = labeler.get_judge("vowels")
    assert judge("", "aeiou") == 1.0
    assert judge("", "bcd.") == 0.0
    assert judge("", "Tea.") == 0.5
    assert judge("", "") == 0.0


@pytest.mark.parametrize("name", ["letter_", "letter_ee", "letter_1", "vowel", None])
def test_unknown_judges_are_rejected_with_the_known_ones(name):
    with pytest.raises(ValueError, match=r"unknown judge .*known judges: letter_X: .*; vowels: "):
        labeler.get_judge(name)


def test_judge_scores_decode_tokens_and_padding_decodes_to_nothing():
    responses = np.array([tokens("eeab") + [27, 27], tokens("abcdef")])
    queries = np.array([tokens("eeeee"), tokens("eeeee")])
    scores = labeler.judge_scores(labeler.get_judge("letter_e"), ENCODER, queries, responses)
    np.testing.assert_allclose(scores, [2 / 4, 1 / 6])  # the padded response is four characters long


# ----- the choice ---------------------------------------------------------------------------------------------------

def test_temperature_zero_chooses_the_best():
    rng = np.random.RandomState(0)
    for _ in range(200):
        scores = rng.randn(4)
        assert label_types.choose(scores, 0.0, rng) == int(np.argmax(scores))


def test_temperature_zero_breaks_ties_at_random():
    rng = np.random.RandomState(1)
    picks = [label_types.choose([0.3, 0.1, 0.3, 0.3], 0.0, rng) for _ in range(600)]
    assert set(picks) == {0, 2, 3}
    assert min(np.bincount(picks, minlength=4)[[0, 2, 3]]) > 150  # about 200 each


def proportions(scores, temperature, draws, seed):
    rng = np.random.RandomState(seed)
    picks = [label_types.choose(scores, temperature, rng) for _ in range(draws)]
    return np.bincount(picks, minlength=len(scores)) / draws


def test_high_temperature_is_near_uniform():
    draws = 8000
    observed = proportions([0.0, 0.2, 0.5, 1.0], 1000.0, draws, seed=2)
    standard_error = np.sqrt(0.25 * 0.75 / draws)
    assert np.all(np.abs(observed - 0.25) < 5 * standard_error), observed


def test_choices_follow_the_softmax_of_the_scores():
    scores, temperature, draws = np.array([0.0, 0.1, 0.3]), 0.1, 8000
    expected = np.exp(scores / temperature) / np.exp(scores / temperature).sum()  # about [0.09, 0.24, 0.67]
    observed = proportions(scores, temperature, draws, seed=3)
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected * (1 - expected) / draws)), (observed, expected)


def test_the_choice_is_reproducible_from_the_seed():
    assert np.array_equal(proportions([0, 1, 2], 1.0, 300, seed=4), proportions([0, 1, 2], 1.0, 300, seed=4))


def test_negative_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        label_types.choose([0.0, 1.0], -1.0, np.random.RandomState(0))


# ----- records ------------------------------------------------------------------------------------------------------

def batch(seed, count, batch_size=8):
    """Queries [b, QUERY_LENGTH] and `count` samples [b, RESPONSE_LENGTH] of random tokens, some padded."""
    rng = np.random.RandomState(seed)
    queries = rng.randint(0, 27, (batch_size, QUERY_LENGTH)).astype(np.int32)
    samples = [rng.randint(0, 27, (batch_size, RESPONSE_LENGTH)).astype(np.int64) for _ in range(count)]
    samples[0][0, 4:] = ENCODING.padding_token
    return queries, samples


def assert_token_list(value, length):
    assert isinstance(value, list) and len(value) == length
    assert all(type(token) is int for token in value)  # plain ints (JSON), not numpy integers


def check_against_label_types(records, label_type_name):
    """The records pass the reward trainer's own validation of label files."""
    label_types.validate_records(records, label_types.get(label_type_name), query_length=QUERY_LENGTH,
                                 response_length=RESPONSE_LENGTH, encoding=ENCODING, source="made by the labeler")


def test_best_of_n_records_have_the_released_fields_and_the_judges_choice():
    judge = labeler.get_judge("letter_e")
    queries, samples = batch(5, 4)
    records = labeler.make_records(label_types.get("best_of_4"), queries, samples, judge, ENCODER, 0.0,
                                   np.random.RandomState(0))
    assert len(records) == len(queries)
    for i, record in enumerate(records):
        assert list(record) == ["query", "sample0", "sample1", "sample2", "sample3", "best"]
        assert_token_list(record["query"], QUERY_LENGTH)
        assert record["query"] == queries[i].tolist()
        for n in range(4):
            assert_token_list(record[f"sample{n}"], RESPONSE_LENGTH)
            assert record[f"sample{n}"] == samples[n][i].tolist()
        assert type(record["best"]) is int
        scores = [judge(ENCODER.decode(queries[i]), ENCODER.decode(samples[n][i])) for n in range(4)]
        assert scores[record["best"]] == max(scores)
    check_against_label_types(records, "best_of_4")


def test_scalar_rating_records():
    judge = labeler.get_judge("vowels")
    queries, samples = batch(6, 1)
    records = labeler.make_records("scalar_rating", queries, samples, judge, ENCODER, 0.0, np.random.RandomState(0))
    for i, record in enumerate(records):
        assert list(record) == ["query", "sample", "score"]
        assert_token_list(record["sample"], RESPONSE_LENGTH)
        assert type(record["score"]) is float
        assert record["score"] == judge("", ENCODER.decode(samples[0][i]))
    check_against_label_types(records, "scalar_rating")


def test_scalar_compare_records_hold_the_difference_sample1_minus_sample0():
    judge = labeler.get_judge("letter_a")
    queries, samples = batch(7, 2)
    records = labeler.make_records(label_types.get("scalar_compare"), queries, samples, judge, ENCODER, 0.0,
                                   np.random.RandomState(0))
    for i, record in enumerate(records):
        assert list(record) == ["query", "sample0", "sample1", "difference"]
        expected = judge("", ENCODER.decode(samples[1][i])) - judge("", ENCODER.decode(samples[0][i]))
        assert type(record["difference"]) is float and record["difference"] == pytest.approx(expected)
    check_against_label_types(records, "scalar_compare")


def test_scalar_labels_get_gaussian_noise_of_the_temperature():
    judge = labeler.get_judge("letter_e")
    queries, samples = batch(8, 2, batch_size=2000)
    exact = labeler.make_records("scalar_compare", queries, samples, judge, ENCODER, 0.0, np.random.RandomState(0))
    noisy = labeler.make_records("scalar_compare", queries, samples, judge, ENCODER, 0.5, np.random.RandomState(0))
    noise = np.array([n["difference"] - e["difference"] for n, e in zip(noisy, exact)])
    assert abs(noise.mean()) < 5 * 0.5 / np.sqrt(len(noise))
    assert noise.std() == pytest.approx(0.5, rel=0.1)


def letter_rich_batch(seed, count, num_samples):
    """Queries [count, QUERY_LENGTH] and `num_samples` responses [count, RESPONSE_LENGTH] whose share of e's
    varies from sample to sample (uniform random letters rarely hold an e, and would mostly tie)."""
    rng = np.random.RandomState(seed)
    queries = rng.randint(0, 27, (count, QUERY_LENGTH)).astype(np.int32)
    samples = []
    for _ in range(num_samples):
        share = rng.uniform(0, 0.7, (count, 1))  # this sample's probability of an "e" at each position
        letters = rng.randint(0, 27, (count, RESPONSE_LENGTH))
        samples.append(np.where(rng.uniform(size=(count, RESPONSE_LENGTH)) < share, tokens("e")[0], letters))
    return queries, samples


def agreement_with_the_judge(scores, temperature):
    """Per record, the probability that a softmax(scores / temperature) pick is one of the best samples: the
    judge at that temperature. scores [n, N] -> [n]"""
    logits = (scores - scores.max(axis=1, keepdims=True)) / temperature
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return (probabilities * (scores == scores.max(axis=1, keepdims=True))).sum(axis=1)


def test_noisy_best_of_n_agrees_with_the_judge_as_often_as_its_temperature_says():
    judge, temperature, count = labeler.get_judge("letter_e"), 0.1, 2000
    queries, samples = letter_rich_batch(9, count, 4)
    scores = np.stack([labeler.judge_scores(judge, ENCODER, queries, s) for s in samples], axis=1)  # [count, 4]
    best = scores == scores.max(axis=1, keepdims=True)  # [count, 4]

    def observed_agreement(records):
        return best[np.arange(count), [r["best"] for r in records]].mean()

    # Given these samples, each record agrees with probability p_i: a sum of Bernoulli(p_i), whose mean has
    # standard error sqrt(sum p_i (1 - p_i)) / count (about 0.007 here, so the band is about ±0.03).
    p = agreement_with_the_judge(scores, temperature)
    expected, standard_error = p.mean(), np.sqrt(np.sum(p * (1 - p))) / count  # expected ≈ 0.88
    band = 4 * standard_error
    records = labeler.make_records("best_of_4", queries, samples, judge, ENCODER, temperature,
                                   np.random.RandomState(0))
    assert abs(observed_agreement(records) - expected) < band, (observed_agreement(records), expected, band)

    # The band tells the temperature apart: a judge 10x noisier (≈0.42), 10x sharper (≈1.0) or a random pick
    # (≈0.33) is expected more than its own 4 standard errors outside it, and labels made so do fall outside it.
    for name, p_wrong in {"temperature x10": agreement_with_the_judge(scores, 10 * temperature),
                          "temperature /10": agreement_with_the_judge(scores, temperature / 10),
                          "random pick": best.mean(axis=1)}.items():
        wrong_error = np.sqrt(np.sum(p_wrong * (1 - p_wrong))) / count
        assert abs(p_wrong.mean() - expected) > band + 4 * wrong_error, (name, p_wrong.mean(), expected, band)
    for wrong_temperature in (10 * temperature, temperature / 10):
        records = labeler.make_records("best_of_4", queries, samples, judge, ENCODER, wrong_temperature,
                                       np.random.RandomState(0))
        assert abs(observed_agreement(records) - expected) > band, wrong_temperature
    random_picks = np.random.RandomState(0).randint(0, 4, count)
    assert abs(best[np.arange(count), random_picks].mean() - expected) > band


@pytest.mark.parametrize("label_type, count, message", [
    ("best_of_4", 3, "best_of_N records need 4 samples per query, got 3"),
    ("scalar_rating", 2, "scalar_rating records need 1 samples per query, got 2"),
    ("best_of_1", 1, r"cannot make 'best_of_1' labels; accepted label types: best_of_N \(N >= 2"),
    ("pairwise", 2, "cannot make 'pairwise' labels"),
])
def test_bad_requests_are_rejected(label_type, count, message):
    queries, samples = batch(10, count)
    with pytest.raises(ValueError, match=message):
        labeler.make_records(label_type, queries, samples, labeler.get_judge("vowels"), ENCODER, 0.0,
                             np.random.RandomState(0))


def test_samples_must_match_the_queries():
    queries, samples = batch(11, 2)
    with pytest.raises(ValueError, match=r"sample 1 must be \[batch=8, response_length\]"):
        labeler.make_records("scalar_compare", queries, [samples[0], samples[1][:3]], labeler.get_judge("vowels"),
                             ENCODER, 0.0, np.random.RandomState(0))


# ----- the label file -----------------------------------------------------------------------------------------------

def test_label_file_round_trips_through_json_and_loads_for_training(tmp_path):
    queries, samples = batch(12, 4)
    records = labeler.make_records("best_of_4", queries, samples, labeler.get_judge("letter_e"), ENCODER, 1.0,
                                   np.random.RandomState(3))
    path = tmp_path / "labels" / "offline.json"
    labeler.write_label_file(str(path), records)
    assert json.loads(path.read_text()) == records
    assert os.listdir(path.parent) == ["offline.json"]  # no temporary file left behind
    loaded = label_types.load_labels(str(path), label_types.get("best_of_4"), query_length=QUERY_LENGTH,
                                     response_length=RESPONSE_LENGTH, encoding=ENCODING)
    np.testing.assert_array_equal(loaded["best"], [r["best"] for r in records])
    np.testing.assert_array_equal(loaded["sample2"], samples[2])


def test_rewriting_a_label_file_replaces_it_whole(tmp_path):
    path = str(tmp_path / "labels.json")
    labeler.write_label_file(path, [{"query": [1]}] * 50)
    labeler.write_label_file(path, [])
    with open(path) as f:
        assert json.load(f) == []


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r.update(best=4), r"record 3, field 'best': 4 is out of range \[0, 4\)"),
    (lambda r: r.pop("sample2"), r"record 3: field 'sample2' is missing"),
    (lambda r: r["sample1"].append(0), r"record 3, field 'sample1': expected 6 token ids, got 7"),
    (lambda r: r["query"].__setitem__(2, 99), r"record 3, field 'query'\[2\]: token id 99 is out of range"),
    (lambda r: r.update(best=1.0), r"record 3, field 'best': expected an integer index"),
])
def test_a_corrupted_label_file_is_rejected_naming_the_file_record_and_field(tmp_path, corrupt, message):
    queries, samples = batch(13, 4)
    records = labeler.make_records("best_of_4", queries, samples, labeler.get_judge("letter_e"), ENCODER, 0.0,
                                   np.random.RandomState(0))
    corrupt(records[3])
    path = str(tmp_path / "corrupted.json")
    labeler.write_label_file(path, records)
    with pytest.raises(label_types.LabelFileError, match=message) as error:
        label_types.load_labels(path, label_types.get("best_of_4"), query_length=QUERY_LENGTH,
                                response_length=RESPONSE_LENGTH, encoding=ENCODING)
    assert str(error.value).startswith(path)


def test_label_samples_draws_the_label_types_samples_per_batch_and_stops_at_count():
    rng = np.random.RandomState(14)
    batches = iter([rng.randint(0, 27, (4, QUERY_LENGTH)) for _ in range(3)])
    calls = []

    def sample(queries):  # a stand-in policy: one fresh random response per query
        calls.append(queries)
        return rng.randint(0, 27, (len(queries), RESPONSE_LENGTH))

    records = labeler.label_samples(sample, batches, label_types.get("best_of_3"), labeler.get_judge("vowels"),
                                    ENCODER, 10, 0.0, np.random.RandomState(0))
    assert len(records) == 10  # 3 batches of 4, cut to the count
    assert len(calls) == 9 and all(calls[i] is calls[3 * (i // 3)] for i in range(9))  # 3 samples per batch
    assert [r["query"] for r in records] == [q.tolist() for batch in calls[::3] for q in batch][:10]
    check_against_label_types(records, "best_of_3")


# ----- the `label` command ------------------------------------------------------------------------------------------

def demo_task(**overrides):
    """The `demo` experiment's task (query_length 8, response_length 12, the `test` encoding)."""
    from lm_human_preferences import experiments
    return experiments.resolve_hparams("train_reward", "demo", "label", overrides=overrides).task


def load(path, label_type, task):
    return label_types.load_labels(str(path), label_types.get(label_type), query_length=task.query_length,
                                   response_length=task.response_length, encoding=ENCODING)


def test_label_command_writes_a_valid_file_of_the_demo_policys_samples_judged(tmp_path, capsys):
    from lm_human_preferences import lm_tasks
    path = tmp_path / "out" / "labels.json"
    labeler.label_command("demo", str(path), count=6, judge="letter_e", seed=3)  # the CLI passes text, too
    assert "wrote 6 best_of_4 labels" in capsys.readouterr().out
    task = demo_task()
    loaded = load(path, "best_of_4", task)  # the experiment's label type, validated as reward training will
    records = json.loads(path.read_text())
    assert len(records) == 6 and list(records[0]) == ["query", "sample0", "sample1", "sample2", "sample3", "best"]
    # the queries are the task's training queries in the seed's order
    expected_queries = next(lm_tasks.query_batches(task, ENCODER, 6, mode="train", seed=3, rank=0, size=1))
    np.testing.assert_array_equal(loaded["query"], expected_queries)
    # the samples differ (the policy samples, it does not repeat itself), and the judge picked the best one
    judge = labeler.get_judge("letter_e")
    for record in records:
        assert len({tuple(record[f"sample{n}"]) for n in range(4)}) == 4
        scores = [judge("", ENCODER.decode(record[f"sample{n}"])) for n in range(4)]
        assert scores[record["best"]] == max(scores)


def test_label_command_takes_the_label_type_overrides_and_postprocesses_responses(tmp_path):
    path = tmp_path / "compare.json"
    # as the command line hands them over: text
    labeler.label_command("demo", str(path), count="10", judge="vowels", temperature="0.5",
                          label_type="scalar_compare", seed="1", **{"task.response_length": "7",
                                                                   "task.truncate_token": "26",
                                                                   "task.truncate_after": "2"})
    task = demo_task(**{"task.response_length": 7})
    loaded = load(path, "scalar_compare", task)
    assert loaded["sample0"].shape == (10, 7) and loaded["difference"].dtype == np.float32
    truncated = 0
    for sample in np.concatenate([loaded["sample0"], loaded["sample1"]]):
        ends = [i for i, token in enumerate(sample) if token == 26 and i >= 2]  # "." at index >= 2 ends it
        if ends:
            assert np.all(sample[ends[0] + 1:] == ENCODING.padding_token), sample
            truncated += ends[0] < 6
    assert truncated > 0  # the check above saw real truncations


def test_label_command_is_reproducible_from_its_seed(tmp_path):
    paths = [tmp_path / name for name in ("a.json", "b.json", "c.json")]
    for path, seed in zip(paths, (5, 5, 6)):
        labeler.label_command("demo", str(path), count=4, judge="letter_a", label_type="scalar_rating",
                              temperature=0.1, seed=seed)
    first, again, other = (json.loads(path.read_text()) for path in paths)
    assert first == again
    assert first != other


@pytest.mark.parametrize("arguments, message", [
    (dict(count=0), r"--count: got 0, expected a positive number of labels"),
    (dict(count="many"), r"--count: got 'many'"),
    (dict(count=2.5), r"--count: got 2.5"),
    (dict(temperature=-1), r"--temperature: got -1, expected a judge noise >= 0"),
    (dict(judge="letter_ab"), r"unknown judge 'letter_ab'; known judges: letter_X"),
    (dict(label_type="pairs"), r"unknown label type 'pairs'; accepted: best_of_N"),
    (dict(experiment="nonesuch"), r"unknown train_reward experiment 'nonesuch'; known experiments: .*demo"),
    (dict(output="gs://bucket/labels.json"), r"expected a local file path"),
    (dict(**{"task.query_lenght": 3}), r"unknown hyperparameter 'task.query_lenght'; did you mean task.query_length"),
])
def test_label_command_rejects_bad_arguments_before_writing(tmp_path, arguments, message):
    output = str(tmp_path / "labels.json")
    call = dict(experiment="demo", output=output, count=4, judge="letter_e")
    call.update(arguments)
    with pytest.raises(ValueError, match=message):
        labeler.label_command(call.pop("experiment"), call.pop("output"), **call)
    assert not os.path.exists(output)


def test_label_command_never_overwrites_an_existing_label_file(tmp_path):
    output = tmp_path / "labels.json"
    output.write_text("[]\n")  # e.g. a day of people's labels
    with pytest.raises(ValueError, match=r"labels.json: the file exists, and a label file is never overwritten; "
                                         r"give another path or remove it$"):
        labeler.label_command("demo", str(output), count=4, judge="letter_e")
    assert output.read_text() == "[]\n" and os.listdir(tmp_path) == ["labels.json"]


def test_a_label_file_made_meanwhile_is_not_overwritten_either(tmp_path, monkeypatch):
    output = tmp_path / "labels.json"
    real = labeler.sample_policy_records

    def someone_writes_it_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        output.write_text("theirs\n")
        return result
    monkeypatch.setattr(labeler, "sample_policy_records", someone_writes_it_meanwhile)
    with pytest.raises(ValueError, match="the file exists, and a label file is never overwritten"):
        labeler.label_command("demo", str(output), count=4, judge="letter_e")
    assert output.read_text() == "theirs\n" and os.listdir(tmp_path) == ["labels.json"]
