"""`./launch.py labels_from_text`: text comparisons -> a label file in the released token-id format that the label
loader reads back to the same texts and train_reward trains on (a real run); the task's lengths, padding and
truncate_token rule, a run directory as the source, and every user error in one line with nothing written."""

import json
import os

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import experiments, label_types, train_reward
from lm_human_preferences.language import encodings

from test_launch import cli, run_cli
from test_score import refused, write_lines

ALPHABET = "abcdefghijklmnopqrstuvwxyz."  # the `test` encoding (docs/formats.md)
PADDING = 27
QUERY_LENGTH, RESPONSE_LENGTH = 3, 4  # the `test` experiment's task


def random_text(rng, most):
    return "".join(rng.choice(list(ALPHABET), rng.randint(0, most + 1)))


def comparisons(label_type, count, seed=0):
    """Input records of `label_type` with random texts of the test alphabet, samples as fields or as a list."""
    rng = np.random.RandomState(seed)
    records = []
    for index in range(count):
        record = {"query": random_text(rng, QUERY_LENGTH)}
        if label_type == "best_of_4":
            samples = [random_text(rng, RESPONSE_LENGTH) for _ in range(4)]
            if index % 2:
                record["samples"] = samples
            else:
                record.update({f"sample{i}": text for i, text in enumerate(samples)})
            record["best"] = int(rng.randint(4))
        elif label_type == "scalar_rating":
            record.update(sample=random_text(rng, RESPONSE_LENGTH), score=float(rng.normal()))
        else:
            record.update(sample0=random_text(rng, RESPONSE_LENGTH), sample1=random_text(rng, RESPONSE_LENGTH),
                          difference=float(rng.randint(-3, 4)))
        record["labeler"] = f"person {index % 3}"
        records.append(record)
    return records


def samples_of(record):
    return record["samples"] if "samples" in record else \
        [record[name] for name in ("sample", "sample0", "sample1", "sample2", "sample3") if name in record]


def padded(text, length):
    return [ALPHABET.index(c) for c in text] + [PADDING] * (length - len(text))


@pytest.mark.parametrize("label_type, label_field", [
    ("best_of_4", "best"), ("scalar_rating", "score"), ("scalar_compare", "difference")])
def test_texts_become_a_label_file_that_loads_and_decodes_back_to_the_texts(tmp_path, capsys, label_type,
                                                                             label_field):
    given = comparisons(label_type, 12)
    source = write_lines(tmp_path / "in.jsonl", *(json.dumps(r) for r in given))
    output = tmp_path / "labels.json"
    cli.main(["labels_from_text", "test", source, str(output), "--label_type", label_type])
    assert capsys.readouterr().out == (f"wrote 12 {label_type} labels for experiment test (query_length 3, "
                                       f"response_length 4, encoding test) to {output}\n")
    records = json.loads(output.read_text())
    kind = label_types.get(label_type)
    # the released format: token ids, padded with 27 to the task's lengths; the texts' tokens computed here
    for made, record in zip(records, given):
        assert made["query"] == padded(record["query"], QUERY_LENGTH)
        assert [made[name] for name in kind.sample_fields()] == [padded(s, RESPONSE_LENGTH) for s in samples_of(record)]
        assert made[label_field] == record[label_field] and made["labeler"] == record["labeler"]
        assert "samples" not in made
    loaded = label_types.load_labels(str(output), kind, query_length=QUERY_LENGTH, response_length=RESPONSE_LENGTH,
                                     encoding=encodings.get("test"))
    decoder = encodings.get("test").get_encoder()
    assert [decoder.decode(q) for q in loaded["query"]] == [r["query"] for r in given]
    for index, name in enumerate(kind.sample_fields()):
        assert [decoder.decode(s) for s in loaded[name]] == [samples_of(r)[index] for r in given]
    np.testing.assert_allclose(loaded[label_field], [r[label_field] for r in given])


def test_train_reward_trains_on_the_file_and_its_run_directory_makes_the_same_file(tmp_path, capsys):
    given = comparisons("best_of_4", 16, seed=1)
    source = write_lines(tmp_path / "in.jsonl", *(json.dumps(r) for r in given))
    labels = tmp_path / "labels.json"
    cli.main(["labels_from_text", "test", source, str(labels)])  # the experiment's labels.type: best_of_4
    hparams = experiments.resolve_hparams("train_reward", "test", "from_text", save_dir=str(tmp_path / "runs"),
                                          overrides={"labels.source": str(labels), "labels.judge": "none"})
    with tf.Graph().as_default():
        train_reward.train(hparams)
    run_dir = hparams.run.save_dir
    assert os.path.exists(os.path.join(run_dir, "reward_model", "checkpoints", "model.ckpt.index"))
    assert not os.path.exists(os.path.join(run_dir, "labels.json"))  # the file's labels, not the judge's
    capsys.readouterr()
    again = tmp_path / "again.json"
    cli.main(["labels_from_text", run_dir, source, str(again)])
    assert f"for train_reward run {run_dir} " in capsys.readouterr().out
    assert again.read_text() == labels.read_text()


def test_the_tasks_truncate_token_cuts_samples_and_truncate_cuts_long_texts(tmp_path, capsys):
    records = [{"query": "abcdef", "samples": ["aebc", "eabc", "xyzeq", "beea"], "best": 0}]
    source = write_lines(tmp_path / "in.jsonl", *(json.dumps(r) for r in records))
    output = tmp_path / "labels.json"
    cli.main(["labels_from_text", "test", source, str(output), "--truncate", "--task.truncate_token", "4",
              "--task.truncate_after", "1"])
    assert capsys.readouterr().out.endswith("; 2 samples cut after the task's truncate_token\n")
    [made] = json.loads(output.read_text())
    assert made["query"] == padded("abc", 3)  # the first query_length tokens
    # after the first "e" at index >= 1: padding, as labelers saw the samples; "xyzeq" is first cut to 4 tokens
    assert [made[f"sample{i}"] for i in range(4)] == [padded("ae", 4), padded("eabc", 4), padded("xyze", 4),
                                                      padded("be", 4)]


# ----- user errors: one line, before any work, nothing written --------------------------------------------------

GOOD = {"query": "abc", "sample0": "a", "sample1": "b", "sample2": "c", "sample3": "d", "best": 1}


def changed(**fields):
    record = {**GOOD, **fields}
    return json.dumps({k: v for k, v in record.items() if v is not None})


@pytest.mark.parametrize("lines, flags, expected", [
    ([changed(), changed(query=None)], [], "{in}:2: field 'query' is missing (records have query, sample0, sample1, "
                                           "sample2, sample3, best)"),
    ([changed(best=None)], [], "{in}:1: field 'best' is missing"),
    ([changed(), "", changed(best=4)], [], "{in}:3, field 'best': 4 is out of range [0, 4)"),
    ([changed(best="2")], [], "{in}:1, field 'best': expected an integer index in [0, 4), got '2'"),
    (['{"query": "a", "sample": "b", "score": NaN}'], ["--label_type", "scalar_rating"],
     "{in}:1, field 'score': expected a finite number, got nan"),
    ([json.dumps({"query": "a", "samples": ["a", "b", "c"], "best": 0})], [],
     "{in}:1, field 'samples': 3 samples, but best_of_4 records have 4; for 3 samples use --label_type best_of_3"),
    ([changed(sample4="e")], [], "{in}:1: field 'sample4' is not a sample of best_of_4 records (they have sample0, "
                                 "sample1, sample2, sample3); for 5 samples use --label_type best_of_5"),
    ([json.dumps({**GOOD, "samples": ["a", "b", "c", "d"]})], [], "{in}:1: give the samples either as a list "
                                                                  "\"samples\" or as fields"),
    ([changed(sample1=["b"])], [], "{in}:1, field 'sample1': expected a text (a JSON string), got [\"b\"]"),
    ([changed(sample2="abcde")], [], "{in}:1, field 'sample2': the text is 5 tokens, more than the run's "
                                     "task.response_length of 4; shorten it, or keep its first 4 tokens with "
                                     "--truncate"),
    ([changed(), '{"query": "abc",'], [], "{in}:2: not valid JSON"),
    ([], [], "{in}: the file holds no records"),
    ([changed()], ["--label_type", "best_of_1"], "unknown label type 'best_of_1'"),
    ([changed()], ["--task.response_length", "0"], "task.response_length must be positive"),
])
def test_bad_comparisons_are_refused_naming_the_line_and_field(tmp_path, capsys, lines, flags, expected):
    source = write_lines(tmp_path / "in.jsonl", *lines)
    message = refused(capsys, "labels_from_text", "test", source, tmp_path / "labels.json", *flags)
    assert expected.format(**{"in": source}) in message
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_bad_sources_and_an_existing_output_are_refused(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", changed())
    output = tmp_path / "labels.json"
    message = refused(capsys, "labels_from_text", "nonesuch", source, output)
    assert "SOURCE nonesuch: no such run directory, and unknown train_reward experiment 'nonesuch'" in message
    (tmp_path / "notarun").mkdir()
    message = refused(capsys, "labels_from_text", tmp_path / "notarun", source, output)
    assert "expected a train_reward experiment name or a run directory" in message and "it is empty" in message
    run_dir = tmp_path / "run"
    experiments.resolve_hparams("train_reward", "test", "run", save_dir=str(tmp_path)).save_json(
        str(run_dir / "train_reward_hparams.json"))  # what a run writes first
    message = refused(capsys, "labels_from_text", run_dir, source, output, "--task.query_length", "2")
    assert "--task.query_length: a saved run's settings are its own" in message
    assert "no such file" in refused(capsys, "labels_from_text", "test", tmp_path / "missing.jsonl", output)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "notarun", "run"]
    output.write_text("kept\n")
    message = refused(capsys, "labels_from_text", "test", source, output)
    assert f"OUT.json {output} exists, and an output is never overwritten" in message
    assert output.read_text() == "kept\n"


def test_an_experiment_name_wins_over_a_directory_of_that_name_that_holds_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test").mkdir()
    source = write_lines(tmp_path / "in.jsonl", changed())
    cli.main(["labels_from_text", "test", source, "labels.json"])
    assert "best_of_4 labels for experiment test " in capsys.readouterr().out
    assert len(json.loads((tmp_path / "labels.json").read_text())) == 1


def test_the_command_runs_without_tensorflow(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", changed())
    result = run_cli("-X", "importtime", "launch.py", "labels_from_text", "test", source, str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]  # every imported module
    assert "lm_human_preferences.text_labels" in imported
    assert not [name for name in imported if name.split(".")[0] == "tensorflow"]
