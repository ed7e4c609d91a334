"""Preflight checks: a run that cannot work stops in the launching process with one error line naming the
hyperparameter, before any rank starts and before anything is trained or written."""

import json
import os
import re
import time

import pytest

from lm_human_preferences import experiments, preflight
from lm_human_preferences.language import trained_models
from lm_human_preferences.language.model import HParams as ModelHParams
from lm_human_preferences.utils import files
from test_launch import run_cli  # a real launch.py subprocess

TEST_MODEL = trained_models.BUILTIN_MODELS["test"]["hparams"]  # n_ctx 8, the `test` encoding
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused at once


@pytest.fixture(autouse=True)
def no_fetch_retries(monkeypatch, tmp_path_factory):
    """A fresh, empty download cache, and no retries: an unreachable host fails at once."""
    monkeypatch.setattr(files, "RETRIES", 0)
    monkeypatch.setenv("LMHP_FETCH_RETRIES", "0")
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def launch_train_policy(save_dir, *flags):
    """`./launch.py train_policy test x --save_dir SAVE_DIR FLAGS...` in a subprocess."""
    return run_cli("launch.py", "train_policy", "test", "x", "--save_dir", str(save_dir), *flags, timeout=300)


def refused(result, save_dir) -> str:
    """The one `error: ...` line of a launch refused before it ran; nothing was written to the save directory."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output and "abort" not in output.lower(), output[-3000:]
    assert not os.path.exists(os.path.join(save_dir, "x"))
    return errors[0]


def policy_hparams(save_dir, **overrides):
    return experiments.resolve_hparams("train_policy", "test", "x", save_dir=str(save_dir), overrides=overrides)


def reward_hparams(save_dir, **overrides):
    return experiments.resolve_hparams("train_reward", "test", "x", save_dir=str(save_dir), overrides=overrides)


def saved_model(directory, *, checkpoint=True, encoding="test", **shape):
    """A model directory as a run saves it (hparams.json, encoding, checkpoints/checkpoint naming model.ckpt),
    without real weights: preflight reads no weights."""
    hparams = ModelHParams(**{**TEST_MODEL, **shape})
    trained_models.write_model_files(directory, hparams, encoding)
    if checkpoint:
        os.makedirs(os.path.join(directory, "checkpoints"))
        with open(os.path.join(directory, "checkpoints", "checkpoint"), "w") as f:
            f.write('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')
        open(os.path.join(directory, "checkpoints", "model.ckpt.index"), "w").close()
    return str(directory)


# ----- the command line: the user's three reports ------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--mpi", "2"], "error: ppo.batch_size=7 must be divisible by the number of MPI ranks (2)"),
    (["--dry_run"], "error: the per-rank batch (ppo.batch_size / 1 ranks)=7 must be divisible by ppo.nminibatches (2)"),
])
def test_batch_sizes_that_cannot_split_are_refused_before_any_rank_starts(tmp_path, flags, message):
    result = launch_train_policy(tmp_path, "--ppo.batch_size", "7", "--ppo.nminibatches", "2", *flags)
    assert refused(result, tmp_path) == message
    assert '"ppo"' not in result.stdout  # the dry run printed no hyperparameters


def test_a_response_beyond_the_models_context_is_refused_naming_the_numbers(tmp_path):
    result = launch_train_policy(tmp_path, "--task.response_length", "50")
    assert refused(result, tmp_path) == (
        "error: task.query_length 3 + task.response_length 50 = 53 tokens exceed the context of 8 tokens of the "
        "initial model 'test' (n_ctx); lower task.response_length or task.query_length, or use a model with a "
        "longer context")


def test_a_missing_reward_model_is_refused_naming_the_hyperparameter(tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir")
    result = launch_train_policy(tmp_path, "--rewards.train_new_model", "off", "--rewards.trained_model", missing)
    assert refused(result, tmp_path).startswith(f"error: rewards.trained_model {missing!r} does not exist; "
                                                f"expected a saved reward model: SAVE_DIR/reward_model")


# ----- check(): what passes -------------------------------------------------------------------------------------

def test_the_test_experiments_pass_and_nothing_is_written(tmp_path):
    for hparams, command in ((policy_hparams(tmp_path), "train_policy"), (reward_hparams(tmp_path), "train_reward")):
        preflight.check(command, hparams, 1)
        preflight.check(command, hparams, 1, dry_run=True)
    preflight.check("train_reward", reward_hparams(tmp_path), 2)  # batch_size 8 and rollout_batch_size 8 split
    assert os.listdir(tmp_path) == []


def test_a_saved_reward_model_and_a_local_initial_model_pass(tmp_path):
    reward_model = saved_model(tmp_path / "reward_model")
    initial_model = saved_model(tmp_path / "initial", n_ctx=16)
    hparams = policy_hparams(tmp_path / "runs", **{"rewards.train_new_model": "off",
                                                   "rewards.trained_model": reward_model,
                                                   "task.policy.initial_model": initial_model})
    preflight.check("train_policy", hparams, 1)
    assert not os.path.exists(tmp_path / "runs")


def test_a_dry_run_checks_sizes_and_context_but_no_paths_and_no_network(tmp_path):
    hparams = policy_hparams(tmp_path, **{"rewards.train_new_model.labels.source": str(tmp_path / "missing.json"),
                                          "task.query_source": str(tmp_path / "missing")})
    preflight.check("train_policy", hparams, 1, dry_run=True)
    with pytest.raises(ValueError, match="^rewards.train_new_model.labels.source .* does not exist"):
        preflight.check("train_policy", hparams, 1)
    with pytest.raises(ValueError, match=r"= 53 tokens exceed the context of 8 tokens"):
        preflight.check("train_policy", policy_hparams(tmp_path, **{"task.response_length": 50}), 1, dry_run=True)
    # the paper's experiments read GPT-2 124M's shape over the network: not in a dry run
    paper = experiments.resolve_hparams("train_policy", "descriptiveness", "x", save_dir=str(tmp_path))
    preflight.check("train_policy", paper, 1, dry_run=True)
    assert os.listdir(files.cache_dir()) == []


# ----- check(): sizes ---------------------------------------------------------------------------------------------

def test_the_nested_reward_models_sizes_are_checked_on_the_real_number_of_ranks(tmp_path):
    hparams = policy_hparams(tmp_path, **{"ppo.batch_size": 16, "rewards.train_new_model.labels.num_train": 18,
                                          "rewards.train_new_model.batch_size": 9})
    preflight.check("train_policy", hparams, 1)
    with pytest.raises(ValueError) as error:
        preflight.check("train_policy", hparams, 2)
    assert str(error.value) == "rewards.train_new_model.batch_size=9 must be divisible by the number of MPI ranks (2)"
    hparams = policy_hparams(tmp_path, **{"ppo.batch_size": 16, "rewards.train_new_model.rollout_batch_size": 7})
    with pytest.raises(ValueError, match=r"^rewards.train_new_model.rollout_batch_size=7 must be divisible by the "
                                         r"number of MPI ranks \(2\)$"):
        preflight.check("train_policy", hparams, 2)
    with pytest.raises(ValueError, match=r"^rollout_batch_size=7 must be divisible by the number of MPI ranks \(2\)$"):
        preflight.check("train_reward", reward_hparams(tmp_path, rollout_batch_size=7), 2)
    with pytest.raises(ValueError, match=r"^ppo.whiten_rewards whitens each per-rank minibatch, which holds only 4"):
        preflight.check("train_policy", policy_hparams(tmp_path), 2)  # 8 episodes on 2 ranks


# ----- check(): the context budget ------------------------------------------------------------------------------

def test_the_query_prefix_and_suffix_count_in_the_policys_context(tmp_path):
    hparams = policy_hparams(tmp_path, **{"task.query_prefix": "ab", "task.query_suffix": "c",
                                          "task.response_length": 3})
    with pytest.raises(ValueError) as error:
        preflight.check("train_reward", reward_hparams(tmp_path, **{"task.query_prefix": "ab",
                                                                    "task.query_suffix": "c",
                                                                    "task.response_length": 3}), 1)
    assert str(error.value).startswith(
        "task.query_prefix (2 tokens) + task.query_length 3 + task.query_suffix (1 tokens) + task.response_length 3 "
        "= 9 tokens exceed the context of 8 tokens of the initial model 'test' (n_ctx)")
    with pytest.raises(ValueError, match=r"= 9 tokens exceed the context of 8 tokens"):
        preflight.check("train_policy", hparams, 1)


def test_a_saved_reward_model_must_hold_the_bare_query_and_response(tmp_path):
    reward_model = saved_model(tmp_path / "reward_model")  # n_ctx 8
    hparams = policy_hparams(tmp_path, **{"rewards.train_new_model": "off", "rewards.trained_model": reward_model,
                                          "task.policy.initial_model": "demo", "task.query_length": 5,
                                          "task.response_length": 3, "task.query_prefix": "abcdefgh"})
    preflight.check("train_policy", hparams, 1)  # 5 + 3 fit the reward model; the prefix is the policy's only
    hparams.task.response_length = 4
    with pytest.raises(ValueError) as error:
        preflight.check("train_policy", hparams, 1)
    assert str(error.value).startswith(
        f"task.query_length 5 + task.response_length 4 = 9 tokens exceed the context of 8 tokens of the reward "
        f"model rewards.trained_model {reward_model!r} (n_ctx) (it reads the query without task.query_prefix")


def test_the_reward_model_must_read_the_policys_encoding(tmp_path):
    initial_model = saved_model(tmp_path / "gpt2_like", encoding="main", n_vocab=50257)
    hparams = policy_hparams(tmp_path, **{"rewards.train_new_model": "off",
                                          "rewards.trained_model": saved_model(tmp_path / "reward_model"),
                                          "task.policy.initial_model": initial_model})
    with pytest.raises(ValueError, match=r"reads the 'test' encoding, but task.policy.initial_model .* writes the "
                                         r"'main' encoding"):
        preflight.check("train_policy", hparams, 1)


# ----- check(): paths -------------------------------------------------------------------------------------------

def test_a_reward_model_without_its_checkpoint_is_refused(tmp_path):
    reward_model = saved_model(tmp_path / "reward_model", checkpoint=False)
    hparams = policy_hparams(tmp_path, **{"rewards.train_new_model": "off", "rewards.trained_model": reward_model})
    with pytest.raises(ValueError) as error:
        preflight.check("train_policy", hparams, 1)
    assert str(error.value).startswith(
        f"rewards.trained_model {reward_model!r}: no TensorFlow checkpoint (state file `checkpoint`) in "
        f"{reward_model} or {os.path.join(reward_model, 'checkpoints')}; expected a saved reward model")
    os.remove(saved_model(tmp_path / "named_but_gone") + "/checkpoints/model.ckpt.index")
    hparams.rewards.trained_model = str(tmp_path / "named_but_gone")
    with pytest.raises(ValueError, match=r"^rewards.trained_model '.*named_but_gone': .*checkpoint.* names checkpoint "
                                         r".*model.ckpt, but .*model.ckpt.index does not exist"):
        preflight.check("train_policy", hparams, 1)
    os.makedirs(tmp_path / "empty")
    hparams.rewards.trained_model = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"^rewards.trained_model '.*empty' has no hparams.json; expected a saved"):
        preflight.check("train_policy", hparams, 1)


def test_an_unreachable_initial_model_is_a_clear_error_at_once(tmp_path, monkeypatch):
    url = f"{CLOSED_PORT}/model"
    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        preflight.check("train_reward", reward_hparams(tmp_path, **{"task.policy.initial_model": url}), 1)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert message.startswith(f"task.policy.initial_model {url!r}: could not check whether {url}/encoding exists: "
                              f"host unreachable (offline?)")
    assert message.endswith(  # every file of the model the cache lacks, each with the cache path to copy it to
        f"; 4 files of model {url} not in the cache (fetch them where there is a network and copy each to the path "
        f"after its URL, or point $LMHP_CACHE_DIR at a cache holding them): {url}/encoding -> "
        f"{files.cache_path(url + '/encoding')}, {url}/hparams.json -> {files.cache_path(url + '/hparams.json')}, "
        f"{url}/checkpoints/checkpoint -> {files.cache_path(url + '/checkpoints/checkpoint')}, the .index and "
        f".data-00000-of-00001 files of the checkpoint {url}/checkpoints/checkpoint names -> "
        f"{os.path.dirname(files.cache_path(url + '/checkpoints/checkpoint'))}{os.sep}")
    # a GPT-2 size, offline: its hparams.json cannot be fetched (the bucket moved to the closed port)
    monkeypatch.setattr(trained_models, "GPT2_MODELS_URL", f"{CLOSED_PORT}/gpt-2/models")
    with pytest.raises(ValueError) as error:
        preflight.check("train_reward", reward_hparams(tmp_path, **{"task.policy.initial_model": "124M"}), 1)
    cache_path = files.cache_path(f"{CLOSED_PORT}/gpt-2/models/124M/hparams.json")
    assert str(error.value).startswith(f"task.policy.initial_model '124M': could not fetch {CLOSED_PORT}/gpt-2/models/"
                                       f"124M/hparams.json: host unreachable (offline?)")
    assert f"cache path {cache_path}; 4 files of model {CLOSED_PORT}/gpt-2/models/124M not in the cache" in \
        str(error.value)
    assert not os.path.exists(tmp_path / "x")


def test_an_unknown_initial_model_names_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match=r"^task.policy.initial_model '125M' does not exist; expected a built-in model "
                                         r"\(test, demo\), a GPT-2 size"):
        preflight.check("train_reward", reward_hparams(tmp_path, **{"task.policy.initial_model": "125M"}), 1)


def test_label_files_must_exist_and_hold_a_json_list_of_enough_labels(tmp_path):
    def labels_error(path, command="train_reward"):
        if command == "train_reward":
            hparams = reward_hparams(tmp_path, **{"labels.source": str(path)})
        else:
            hparams = policy_hparams(tmp_path, **{"rewards.train_new_model.labels.source": str(path)})
        with pytest.raises(ValueError) as error:
            preflight.check(command, hparams, 1)
        return str(error.value)

    (tmp_path / "labels.txt").write_text("query,response\n")
    assert labels_error(tmp_path / "labels.txt", "train_policy").startswith(
        f"rewards.train_new_model.labels.source: {tmp_path / 'labels.txt'}: not valid JSON (Expecting value")
    assert labels_error(tmp_path / "labels.txt").endswith("; expected a label file: a JSON list of records")
    (tmp_path / "object.json").write_text('{"query": [1]}')
    assert labels_error(tmp_path / "object.json") == (f"labels.source {str(tmp_path / 'object.json')!r} holds a JSON "
                                                      f"dict; expected a label file: a JSON list of records")
    (tmp_path / "few.json").write_text(json.dumps([{}] * 10))
    assert labels_error(tmp_path / "few.json") == (f"labels.source {str(tmp_path / 'few.json')!r} holds 10 labels, "
                                                   f"but labels.num_train + labels.num_valid = 16 + 0 = 16 are needed")
    assert labels_error(tmp_path / "missing.json", "train_policy").startswith(
        f"rewards.train_new_model.labels.source {str(tmp_path / 'missing.json')!r} does not exist; expected a label "
        f"file")
    assert labels_error(f"{CLOSED_PORT}/labels.json").startswith(
        f"labels.source: could not check whether {CLOSED_PORT}/labels.json exists: host unreachable (offline?)")


def test_a_query_source_must_exist(tmp_path):
    missing = str(tmp_path / "books.jsonl")
    with pytest.raises(ValueError, match=rf"^task.query_source {missing!r} does not exist; expected"):
        preflight.check("train_policy", policy_hparams(tmp_path, **{"task.query_source": missing}), 1)
    with pytest.raises(ValueError, match=r"^task.query_source: could not check whether http://127.0.0.1:9/b.jsonl"):
        preflight.check("train_policy", policy_hparams(tmp_path, **{"task.query_source": f"{CLOSED_PORT}/b.jsonl"}), 1)
    preflight.check_query_source(f"{CLOSED_PORT}/tldr")  # a directory URL: its files are the dataset's to check


def test_the_save_dir_must_be_creatable_and_is_not_created(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    save_dir = str(tmp_path / "file" / "runs")
    with pytest.raises(ValueError) as error:
        preflight.check("train_policy", policy_hparams(save_dir), 1)
    assert str(error.value) == (f"run.save_dir (--save_dir) {os.path.join(save_dir, 'x')!r} cannot be made: "
                                f"{tmp_path / 'file'} is not a directory; expected a directory path that can be "
                                f"created, or a gs://BUCKET/PATH URL")
    preflight.check_save_dir("gs://bucket/runs/x")  # the trainer checks the bucket
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)  # a read-only directory (root ignores modes)
    with pytest.raises(ValueError, match=rf"^run.save_dir \(--save_dir\) '.*new/x' cannot be written: "
                                         rf"{re.escape(str(tmp_path))} is not writable by this user"):
        preflight.check("train_policy", policy_hparams(tmp_path / "new"), 1)
    assert not os.path.exists(tmp_path / "new")
