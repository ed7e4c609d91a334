"""`./launch.py score` and score.RewardScorer: the rewards of texts from a real saved reward model equal an
independent numpy GPT-2 computed in the test from the checkpoint's weights, with the run's task settings (lengths,
padding, the truncate_token rule and penalty); every REWARD_MODEL_DIR form; JSON Lines in and out; every user error
in one line before any work, with nothing written."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import experiments, score, train_policy, train_reward

from test_launch import cli_error, run_cli
from test_model import np_attention, np_gelu, np_layer_norm

ALPHABET = "abcdefghijklmnopqrstuvwxyz."  # the `test` encoding: one token per character (docs/formats.md)
PADDING = 27
QUERY_LENGTH, RESPONSE_LENGTH = 3, 4  # the `test` experiment's task
# The run's task ends a response at its first "e" from the second token on; a response without one takes the
# penalty (-1, the default penalty_reward_value), as PPO scores it.
TASK = {"task.truncate_token": ALPHABET.index("e"), "task.truncate_after": 1}
PENALTY = -1.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real short train_reward run of the `test` experiment, and a real short train_policy run that trained
    against its reward model (rewards.trained_model): {"reward": RUN_DIR, "policy": RUN_DIR}."""
    save_dir = str(tmp_path_factory.mktemp("score_runs"))
    reward_hparams = experiments.resolve_hparams("train_reward", "test", "rm", save_dir=save_dir, overrides=dict(TASK))
    with tf.Graph().as_default():
        train_reward.train(reward_hparams)
    reward_model = os.path.join(reward_hparams.run.save_dir, "reward_model")
    policy_hparams = experiments.resolve_hparams("train_policy", "test", "ppo", save_dir=save_dir, overrides={
        **TASK, "rewards.train_new_model": "off", "rewards.trained_model": reward_model})
    with tf.Graph().as_default():
        train_policy.train(policy_hparams)
    return {"reward": reward_hparams.run.save_dir, "policy": policy_hparams.run.save_dir}


# ----- the independent reference -------------------------------------------------------------------------------

def checkpoint_weights(model_dir):
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    return {name: reader.get_tensor(name).astype(np.float64) for name in reader.get_variable_to_shape_map()}


def numpy_reward(weights, n_head, tokens):
    """gain * (reward head at the last token) + bias for GPT-2 on the real tokens alone: pads are never keys,
    positions count real tokens, and a pad's output is that of the last real token, so the reward of a padded
    query + response is this one (docs/formats.md, padding semantics)."""
    w = {name[len("reward_model/"):]: value for name, value in weights.items()}
    x = w["model/wte"][tokens] + w["model/wpe"][np.arange(len(tokens))]  # [t, e]
    layer = 0
    while f"model/h{layer}/ln_1/g" in w:  # the layers the checkpoint holds
        block = f"model/h{layer}/"
        p = {name[len(block):]: value for name, value in w.items() if name.startswith(block)}
        attention = {name[len("attn/"):]: value for name, value in p.items() if name.startswith("attn/")}
        x = x + np_attention(np_layer_norm(x, p["ln_1/g"], p["ln_1/b"]), attention, n_head)
        h = np_layer_norm(x, p["ln_2/g"], p["ln_2/b"])
        x = x + np_gelu(h @ p["mlp/c_fc/w"][0] + p["mlp/c_fc/b"]) @ p["mlp/c_proj/w"][0] + p["mlp/c_proj/b"]
        layer += 1
    hidden = np_layer_norm(x, w["model/ln_f/g"], w["model/ln_f/b"])[-1]
    raw = hidden @ w["model/heads/reward/w"] + w["model/heads/reward/b"]
    return float(w["reward_norm/gain"] * raw + w["reward_norm/bias"])


def expected_reward(run_dir, query, response):
    """The reward of the texts computed here: the test alphabet's tokens, the response cut after its first "e"
    at index >= 1, or the penalty when it has none."""
    model_dir = os.path.join(run_dir, "reward_model")
    with open(os.path.join(model_dir, "hparams.json")) as f:
        n_head = json.load(f)["n_head"]
    end = response.find("e", 1)
    if end < 0:
        return PENALTY
    tokens = [ALPHABET.index(c) for c in query + response[:end + 1]]
    return numpy_reward(checkpoint_weights(model_dir), n_head, tokens)


def score_cli(*argv):
    """A real `./launch.py score` subprocess."""
    return run_cli("launch.py", "score", *argv, timeout=300)


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


RECORDS = [
    {"query": "abc", "response": "defg", "id": 7},  # cut after its "e": "de"
    {"query": "a", "response": "beef", "note": "naïve ✓"},  # a padded query: pads between query and response
    {"query": "", "response": "zzez"},  # an all-padding query
    {"query": "xyz", "response": "eabc"},  # "e" only at index 0: never ends, the penalty
]


# ----- the command and the Python API -------------------------------------------------------------------------

def test_the_printed_reward_equals_the_numpy_reference(runs):
    result = score_cli(runs["reward"], "--query", "abc", "--response", "aeb")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") == 1  # the reward alone
    reward = float(result.stdout)
    assert reward == pytest.approx(expected_reward(runs["reward"], "abc", "aeb"), rel=1e-5, abs=1e-5)
    assert reward != PENALTY


def test_jsonl_records_come_back_with_their_rewards_from_a_runs_reward_model_directory(runs, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", *(json.dumps(r, ensure_ascii=False) for r in RECORDS[:2]), "",
                         *(json.dumps(r) for r in RECORDS[2:]))  # a blank line is skipped
    output = tmp_path / "out.jsonl"
    result = score_cli(os.path.join(runs["reward"], "reward_model"), "--input", source, "--output",
                     str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    scored = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in r.items() if k != "reward"} for r in scored] == RECORDS  # fields and order kept
    assert all(list(r)[-1] == "reward" for r in scored)
    for record in scored:
        assert record["reward"] == pytest.approx(expected_reward(runs["reward"], record["query"], record["response"]),
                                                 rel=1e-5, abs=1e-5), record
    assert scored[3]["reward"] == PENALTY
    assert f"{source}:5: the response never ends (no 'e' at token 1 or later), so its reward is the task's " \
           f"penalty -1" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temporary file left behind


def test_a_policy_run_scores_with_the_reward_model_it_trained_against_records_to_stdout(runs, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", *(json.dumps(r) for r in RECORDS))
    result = score_cli(runs["policy"], "--input", source)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] if "id" in r else None for r in scored] == [7, None, None, None]
    for record in scored:
        assert record["reward"] == pytest.approx(expected_reward(runs["reward"], record["query"], record["response"]),
                                                 rel=1e-5, abs=1e-5), record


def test_python_api_keeps_one_session_and_truncates_when_asked(runs):
    queries, responses = [r["query"] for r in RECORDS], [r["response"] for r in RECORDS]
    expected = [expected_reward(runs["reward"], q, r) for q, r in zip(queries, responses)]
    with score.RewardScorer(runs["reward"]) as scorer:
        first = scorer.score(queries, responses)
        session = scorer.sess
        again = scorer.score(queries[:1], responses[:1])
        assert scorer.sess is session
        with pytest.raises(ValueError, match=r"responses\[0\]: the text is 8 tokens, more than the run's "
                                             r"task.response_length of 4; .* truncate=True"):
            scorer.score(["abc"], ["aeiouxyz"])
    assert first.dtype == np.float32 and first.shape == (4,)
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    assert again[0] == first[0]
    # truncate=True keeps the first query_length / response_length tokens: "abcdef" -> "abc", "aeiouxyz" -> "aeio"
    cut = score.score_texts(runs["reward"], ["abcdef"], ["aeiouxyz"], truncate=True)
    np.testing.assert_allclose(cut, [expected_reward(runs["reward"], "abc", "aeio")], rtol=1e-5, atol=1e-5)
    policy = score.score_texts(runs["policy"], queries, responses)
    np.testing.assert_array_equal(policy, first)


# ----- user errors: one line, before any work, nothing written --------------------------------------------------

def refused(capsys, *argv) -> str:
    """launch.py's one-line error, in this process; nothing was printed to stdout."""
    message = cli_error(capsys, *map(str, argv))
    assert capsys.readouterr().out == ""
    return message.splitlines()[0]


def test_what_is_not_a_reward_model_run_is_refused_saying_what_it_holds(runs, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    source = write_lines(tmp_path / "in.jsonl", json.dumps(RECORDS[0]))
    flags = ["--input", source, "--output", output]
    message = refused(capsys, "score", tmp_path / "nowhere", *flags)
    assert "REWARD_MODEL_DIR" in message and "nowhere: expected a train_reward or train_policy run directory" in \
        message and "there is no such directory" in message
    message = refused(capsys, "score", os.path.dirname(runs["reward"]), *flags)
    assert "not a reward-model run" in message and "it holds ppo, rm" in message
    message = refused(capsys, "score", os.path.join(runs["policy"], "policy"), *flags)
    assert "holds no reward model (its checkpoint has no reward_model/model/heads/reward/w; its scopes: policy)" in \
        message
    alone = tmp_path / "alone" / "reward_model"
    shutil.copytree(os.path.join(runs["reward"], "reward_model"), alone)
    message = refused(capsys, "score", alone, *flags)
    assert "a saved model, but its run's hyperparameters" in message and "pass the run directory" in message
    assert sorted(os.listdir(tmp_path)) == ["alone", "in.jsonl"]


@pytest.mark.parametrize("lines, expected", [
    ([json.dumps(RECORDS[0]), json.dumps({"query": "abc"})], "{in}:2: field 'response' is missing (records have "
                                                             "query, response)"),
    ([json.dumps(RECORDS[0]), "", '{"query": "abc", "response": "de"'], "{in}:3: not valid JSON"),
    (['[1, 2]'], "{in}:1: expected a JSON object, got list"),
    (['{"query": 5, "response": "de"}'], "{in}:1, field 'query': expected a text (a JSON string), got 5"),
    (['{"query": "abc", "response": "abcdef"}'], "{in}:1, field 'response': the text is 6 tokens, more than the "
                                                 "run's task.response_length of 4; shorten it, or keep its first 4 "
                                                 "tokens with --truncate"),
    (['{"query": "abcd", "response": "ab"}'], "{in}:1, field 'query': the text is 4 tokens, more than the run's "
                                              "task.query_length of 3"),
    ([], "{in}: the file holds no records"),
])
def test_bad_input_records_are_refused_naming_the_line_and_field(runs, tmp_path, capsys, lines, expected):
    source = write_lines(tmp_path / "in.jsonl", *lines)
    message = refused(capsys, "score", runs["reward"], "--input", source, "--output", tmp_path / "out.jsonl")
    assert expected.format(**{"in": source}) in message
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_flag_mistakes_and_an_existing_output_are_refused(runs, tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", json.dumps(RECORDS[0]))
    output = tmp_path / "out.jsonl"
    output.write_text("kept\n")
    message = refused(capsys, "score", runs["reward"], "--input", source, "--output", output)
    assert f"--output {output} exists, and an output is never overwritten" in message
    assert output.read_text() == "kept\n"
    assert "give --query TEXT and --response TEXT" in refused(capsys, "score", runs["reward"], "--query", "abc")
    assert "not both" in refused(capsys, "score", runs["reward"], "--input", source, "--query", "a", "--response", "b")
    assert "--output applies to --input" in refused(capsys, "score", runs["reward"], "--query", "a", "--response",
                                                      "b", "--output", tmp_path / "new.jsonl")
    message = refused(capsys, "score", runs["reward"], "--query", "abc", "--response", "abcdef")
    assert "--response: the text is 6 tokens, more than the run's task.response_length of 4" in message
    assert "missing.jsonl: no such file" in refused(capsys, "score", runs["reward"], "--input",
                                                      tmp_path / "missing.jsonl")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]
