"""Offline, or with a server that lacks a file, loading a model or a run fails with one error that lists every file
of that model or run missing from the download cache, each with the cache path to copy it to; copying them there
makes the same command work without the network. Models and runs are served by a real HTTP server over a run
directory, or their host refuses connections; through TrainedModel, launch.py and real sample.py subprocesses."""

import functools
import http.server
import json
import os
import shutil
import threading

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences.language import trained_models
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy
from lm_human_preferences.utils import files

from test_launch import load_script, run_cli
from test_train_policy import write_2019_style_run

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused at once
HOW_TO = ("not in the cache (fetch them where there is a network and copy each to the path after its URL, or point "
          "$LMHP_CACHE_DIR at a cache holding them): ")
GPT2_124M_HPARAMS = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
RUN_FILES = ["train_policy_hparams.json", "policy/encoding", "policy/hparams.json", "policy/checkpoints/checkpoint"]
CHECKPOINT_FILES = ["policy/checkpoints/model.ckpt-1000.index", "policy/checkpoints/model.ckpt-1000.data-00000-of-00001"]

launch_cli = load_script("launch.py")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty download cache; no retries."""
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LMHP_FETCH_RETRIES", "0")
    monkeypatch.setattr(files, "RETRIES", 0)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2019-style train_policy run of the `test` model (a real checkpoint, policy/checkpoints/model.ckpt-1000)
    and the values of its policy's variables."""
    directory = str(tmp_path_factory.mktemp("run"))
    with tf.Graph().as_default():
        values = write_2019_style_run(directory)
    return directory, values


@pytest.fixture
def served(tmp_path):
    """A real HTTP server over the directory tmp_path/www (404 for what is not there); yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def listing(pairs):
    return ", ".join(f"{url} -> {path}" for url, path in pairs)


def cached(urls):
    return [(url, files.cache_path(url)) for url in urls]


def copy_in(run_dir, url, names):
    """What a user does after fetching the listed files elsewhere: each into its cache path."""
    for name in names:
        target = files.cache_path(f"{url}/{name}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(run_dir, name), target)


def one_error_line(result) -> str:
    """The single `error: ...` line a command exits with (exit status 1, no traceback)."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


# ----- a released GPT-2 size ------------------------------------------------------------------------------------

def test_a_gpt2_size_that_cannot_be_fetched_lists_its_four_files(served, cache, monkeypatch):
    root, base = served  # a server that holds no model: 404 for each file
    monkeypatch.setattr(trained_models, "GPT2_MODELS_URL", f"{base}/gpt-2/models")
    url = f"{base}/gpt-2/models/124M"
    names = ["hparams.json", "checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001"]
    model = TrainedModel("124M")  # the `main` encoding needs no download
    with pytest.raises(files.MissingFiles) as info:
        model.hparams()
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (f"could not fetch {url}/hparams.json: HTTP 404 File not found (not retried); cache path "
                               f"{files.cache_path(url + '/hparams.json')}; 4 files of model {url} {HOW_TO}"
                               f"{listing(cached(f'{url}/{name}' for name in names))}")

    # offline, with hparams.json copied in: the checkpoint is what fails now; the three files still missing are listed
    monkeypatch.setattr(trained_models, "GPT2_MODELS_URL", f"{CLOSED_PORT}/gpt-2/models")
    url = f"{CLOSED_PORT}/gpt-2/models/124M"
    target = files.cache_path(f"{url}/hparams.json")
    os.makedirs(os.path.dirname(target))
    with open(target, "w") as f:
        json.dump(GPT2_124M_HPARAMS, f)
    assert TrainedModel("124M").hparams().n_layer == 12
    with pytest.raises(files.MissingFiles) as info:
        TrainedModel("124M").checkpoint()
    assert str(info.value).startswith(f"could not check whether {url}/checkpoint exists: host unreachable")
    assert str(info.value).endswith(f"; 3 files of model {url} {HOW_TO}"
                                    f"{listing(cached(f'{url}/{name}' for name in names[1:]))}")
    assert os.listdir(os.path.dirname(target)) == ["hparams.json"]  # nothing else was written


def test_launch_py_names_the_hyperparameter_and_lists_the_models_files(served, cache, monkeypatch, tmp_path):
    """launch.py's entry, in this process (so that the GPT-2 bucket can point at the test server)."""
    root, base = served
    monkeypatch.setattr(trained_models, "GPT2_MODELS_URL", f"{base}/gpt-2/models")
    with pytest.raises(SystemExit) as info:
        launch_cli.main(["train_policy", "test", "x", "--save_dir", str(tmp_path / "save"),
                         "--task.policy.initial_model", "124M"])
    message = info.value.code
    url = f"{base}/gpt-2/models/124M"
    first, hint = message.split("\n")
    assert first.startswith(f"error: task.policy.initial_model '124M': could not fetch {url}/hparams.json: HTTP 404")
    assert first.endswith(f"; 4 files of model {url} {HOW_TO}" + listing(cached(
        f"{url}/{name}" for name in ["hparams.json", "checkpoint", "model.ckpt.index",
                                     "model.ckpt.data-00000-of-00001"])))
    assert hint == "(set LMHP_TRACEBACK=1 to see where it was raised)"
    assert not os.path.exists(tmp_path / "save")


# ----- a saved run's model ---------------------------------------------------------------------------------------

def test_copying_the_listed_files_into_the_cache_loads_the_model_offline(run_dir, cache):
    directory, values = run_dir
    url = f"{CLOSED_PORT}/runs/descriptiveness/policy"
    with pytest.raises(files.MissingFiles) as info:
        TrainedModel("policy", savedir=url, scope="policy")  # reads its encoding file first
    message = str(info.value)
    assert message.startswith(f"could not check whether {url}/encoding exists: host unreachable (offline?)")
    checkpoints = files.cache_path(f"{url}/checkpoints/checkpoint")
    assert message.endswith(
        f"; 4 files of model {url} {HOW_TO}"
        + listing(cached(f"{url}/{name}" for name in ["encoding", "hparams.json", "checkpoints/checkpoint"]))
        + f", the .index and .data-00000-of-00001 files of the checkpoint {url}/checkpoints/checkpoint names -> "
          f"{os.path.dirname(checkpoints)}{os.sep}")

    copy_in(directory, f"{CLOSED_PORT}/runs/descriptiveness", RUN_FILES[1:])  # all but the weights
    model = TrainedModel("policy", savedir=url, scope="policy")
    assert model.hparams().n_layer == 2 and model.encoding.name == "test"
    with pytest.raises(files.MissingFiles) as info:
        model.checkpoint()
    assert str(info.value).endswith(  # the state file in the cache names the checkpoint: its two files are listed
        f"; 2 files of model {url} {HOW_TO}"
        + listing(cached(f"{CLOSED_PORT}/runs/descriptiveness/{name}" for name in CHECKPOINT_FILES)))

    copy_in(directory, f"{CLOSED_PORT}/runs/descriptiveness", CHECKPOINT_FILES)
    assert trained_models.missing_files(url) == []
    with tf.Graph().as_default():
        policy = Policy(TrainedModel("policy", savedir=url, scope="policy"), scope="policy")
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())  # the weights, from the copied files, offline
            loaded = {v.op.name: sess.run(v) for v in policy.get_params()}
    assert loaded.keys() == values.keys()
    for name, value in values.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_a_gpt2_model_directory_at_a_url_is_listed_in_its_layout(cache):
    url = f"{CLOSED_PORT}/my/gpt2"
    state = files.cache_path(f"{url}/checkpoint")  # cached: the checkpoint sits beside hparams.json, no encoding
    os.makedirs(os.path.dirname(state))
    with open(state, "w") as f:
        f.write('model_checkpoint_path: "/home/someone/train/model.ckpt-7"\nall_model_checkpoint_paths: "x"\n')
    assert trained_models.missing_files(url) == cached(
        [f"{url}/hparams.json", f"{url}/model.ckpt-7.index", f"{url}/model.ckpt-7.data-00000-of-00001"])
    assert trained_models.missing_files(str(cache)) == [] and trained_models.missing_files(None) == []


# ----- ./sample.py sample ---------------------------------------------------------------------------------------

def test_sample_py_offline_lists_every_file_of_the_run_then_works_once_they_are_copied(run_dir, cache):
    directory, _ = run_dir
    url = f"{CLOSED_PORT}/runs/descriptiveness"
    env = {"LMHP_CACHE_DIR": str(cache), "LMHP_FETCH_RETRIES": "0", "CUDA_VISIBLE_DEVICES": ""}
    error = one_error_line(run_cli("sample.py", "sample", "--save_dir", url, "--nsamples", "2", env=env,
                                   timeout=300))
    assert error.startswith(f"error: could not fetch {url}/train_policy_hparams.json: host unreachable (offline?)")
    checkpoints = os.path.dirname(files.cache_path(f"{url}/policy/checkpoints/checkpoint"))
    assert error.endswith(
        f"; 5 files of run {url} {HOW_TO}" + listing(cached(f"{url}/{name}" for name in RUN_FILES))
        + f", the .index and .data-00000-of-00001 files of the checkpoint {url}/policy/checkpoints/checkpoint names "
          f"-> {checkpoints}{os.sep}")
    assert not os.path.exists(cache) or not any(name.endswith(".part") for _, _, names in os.walk(cache)
                                                for name in names)

    copy_in(directory, url, RUN_FILES + CHECKPOINT_FILES)
    result = run_cli("sample.py", "sample", "--save_dir", url, "--nsamples", "2", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("=" * 80 + "\n") == 2  # sampled without the network


def test_sample_py_with_a_server_that_lacks_the_run_lists_it(served, cache):
    root, base = served
    url = f"{base}/runs/gone"
    result = run_cli("sample.py", "sample", "--save_dir", url, "--nsamples", "1",
                     env={"LMHP_CACHE_DIR": str(cache), "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    error = one_error_line(result)
    assert error.startswith(f"error: could not fetch {url}/train_policy_hparams.json: HTTP 404 File not found "
                            f"(not retried); cache path {files.cache_path(url + '/train_policy_hparams.json')}; "
                            f"5 files of run {url} {HOW_TO}{url}/train_policy_hparams.json -> ")
    assert "downloaded" not in result.stderr  # nothing was fetched


def test_launch_py_lists_the_files_of_a_saved_reward_model_it_cannot_reach(cache, tmp_path):
    url = f"{CLOSED_PORT}/runs/descriptiveness/reward_model"
    result = run_cli("launch.py", "train_policy", "test", "x", "--save_dir", str(tmp_path / "save"),
                     "--rewards.train_new_model", "off", "--rewards.trained_model", url,
                     env={"LMHP_CACHE_DIR": str(cache), "LMHP_FETCH_RETRIES": "0"}, timeout=300)
    error = one_error_line(result)
    assert error.startswith(f"error: rewards.trained_model {url!r}: could not check whether {url}/encoding exists: "
                            f"host unreachable (offline?)")
    assert f"; 4 files of model {url} {HOW_TO}" + listing(cached(
        f"{url}/{name}" for name in ["encoding", "hparams.json", "checkpoints/checkpoint"])) in error
    assert not os.path.exists(tmp_path / "save")


def test_sample_py_on_two_ranks_offline_says_it_once(cache):
    """Each rank meets the error (rank 1 receives rank 0's); the job shows the one line once."""
    url = f"{CLOSED_PORT}/runs/descriptiveness"
    result = run_cli("sample.py", "sample", "--save_dir", url, "--nsamples", "1", "--mpi", "2",
                     env={"LMHP_CACHE_DIR": str(cache), "LMHP_FETCH_RETRIES": "0", "CUDA_VISIBLE_DEVICES": ""},
                     timeout=300)
    error = one_error_line(result)
    assert error.startswith(f"error: could not fetch {url}/train_policy_hparams.json: host unreachable (offline?)")
    assert f"; 5 files of run {url} {HOW_TO}{url}/train_policy_hparams.json -> " in error
    assert result.stderr.count("(set LMHP_TRACEBACK=1") == 1 and "abort" not in result.stderr.lower()
