"""In-graph sampling (language/sample.py): greedy limits, log-probs and values against a full forward pass,
filtering, seeds. And the `./sample.py sample` command: its 2019 defaults, `--temperature task`, --mpi."""

import inspect
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences.language import model as lm_model
from lm_human_preferences.language import sample

HP = lm_model.HParams(n_vocab=27, n_ctx=32, n_embd=16, n_head=2, n_layer=2)
PAD = 27


def make_model():
    with tf.variable_scope("policy"):
        model = lm_model.Model(HP, scalar_heads=["value"])
    model(tf.zeros([1, 1], tf.int32))  # create the variables outside the sampling loop
    return model


def randomize(sess, scale=0.5, seed=0):
    """Weights large enough that the next-token distribution is far from uniform."""
    rng = np.random.RandomState(seed)
    for var in tf.global_variables():
        value = rng.normal(size=var.shape.as_list()) * scale + (1.0 if var.op.name.endswith("/g") else 0.0)
        var.load(value.astype(np.float32), sess)


class FullPass:
    """Scores whole sequences with one forward pass (no cache): the reference for the sampler."""

    def __init__(self, model):
        self.tokens = tf.placeholder(tf.int32, [None, None])
        self.output = model(self.tokens, padding_token=PAD)

    def __call__(self, sess, tokens):
        return sess.run(self.output, {self.tokens: tokens})


def greedy_continuation(sess, full_pass, context, length):
    tokens = np.array(context, np.int32)
    for _ in range(length):
        logits = full_pass(sess, tokens)["lm_logits"][:, -1]
        tokens = np.concatenate([tokens, logits.argmax(-1)[:, None].astype(np.int32)], axis=1)
    return tokens[:, len(context[0]):]


CONTEXT = np.array([[1, 2, 3, PAD, PAD], [4, PAD, 5, 6, 7], [PAD, PAD, 8, 9, 10]], np.int32)


@pytest.mark.parametrize("options", [dict(temperature=1e-4), dict(top_k=1), dict(top_p=1e-6)])
def test_near_zero_temperature_top_k_1_and_tiny_top_p_are_greedy(options):
    model = make_model()
    full_pass = FullPass(model)
    sampled = sample.sample_sequence(model, length=6, context=CONTEXT, padding_token=PAD, **options)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess)
        expected = greedy_continuation(sess, full_pass, CONTEXT, 6)
        tokens = sess.run(sampled["tokens"])
    np.testing.assert_array_equal(tokens, expected)
    assert len(set(expected.ravel())) > 2  # the random model does not just repeat one token


def test_logprobs_and_values_equal_a_full_forward_pass():
    temperature = 0.7
    model = make_model()
    full_pass = FullPass(model)
    sampled = sample.sample_sequence(model, length=7, context=CONTEXT, temperature=temperature, padding_token=PAD,
                                     extra_outputs={"values": "value"}, seed=1)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess)
        got = sess.run(sampled)
        full = full_pass(sess, np.concatenate([CONTEXT, got["tokens"]], axis=1))
    c = CONTEXT.shape[1]
    logits = full["lm_logits"][:, c - 1:-1] / temperature  # the positions that predicted each sampled token
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.take_along_axis(logp, got["tokens"][:, :, None], axis=2)[:, :, 0]
    np.testing.assert_allclose(got["logprobs"], expected, atol=1e-4)
    np.testing.assert_allclose(got["values"], full["value"][:, c - 1:-1], atol=1e-5)
    assert got["tokens"].shape == got["logprobs"].shape == got["values"].shape == (3, 7)
    assert got["tokens"].max() < HP.n_vocab


def test_samples_follow_the_temperature_scaled_distribution():
    temperature, count = 1.7, 4000
    model = make_model()
    full_pass = FullPass(model)
    context = np.tile(np.array([[3, 1, 4]], np.int32), [count, 1])
    sampled = sample.sample_sequence(model, length=1, context=context, temperature=temperature, seed=2)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess, scale=0.3)
        logits = full_pass(sess, context[:1])["lm_logits"][0, -1] / temperature
        tokens = sess.run(sampled["tokens"])[:, 0]
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    observed = np.bincount(tokens, minlength=HP.n_vocab) / count
    # Standard error of a frequency is sqrt(p(1-p)/n) <= 0.008 here; 5 of them is a safe band.
    band = 5 * np.sqrt(expected * (1 - expected) / count) + 1e-3
    assert np.all(np.abs(observed - expected) < band), (observed, expected)
    assert expected.max() > 2 * expected.min()  # the test would notice a wrong temperature


def test_top_k_and_top_p_filters():
    logits = tf.constant(np.log([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]), tf.float32)
    kept = lambda filtered: (filtered > sample.EXCLUDED_LOGIT / 2).tolist()  # noqa: E731
    with tf.Session() as sess:
        assert kept(sess.run(sample.take_top_k(logits, 2))) == [[True, True, False, False], [False, False, True, True]]
        assert kept(sess.run(sample.take_top_p(logits, 0.8))) == [[True, True, False, False],
                                                                    [False, False, True, True]]
        assert kept(sess.run(sample.take_top_p(logits, 0.85))) == [[True, True, True, False],
                                                                     [False, True, True, True]]
        assert kept(sess.run(sample.take_top_p(logits, 0.01))) == [[True, False, False, False],
                                                                     [False, False, False, True]]


def test_padding_in_the_context_does_not_change_the_samples():
    real = [[5, 9, 2, 7]]
    contexts = np.array([[5, 9, 2, 7, PAD, PAD], [PAD, PAD, 5, 9, 2, 7], [5, PAD, 9, PAD, 2, 7]], np.int32)
    model = make_model()
    padded = sample.sample_sequence(model, length=5, context=contexts, temperature=1e-4, padding_token=PAD,
                                    extra_outputs={"values": "value"})
    plain = sample.sample_sequence(model, length=5, context=real, temperature=1e-4, padding_token=PAD,
                                   extra_outputs={"values": "value"})
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess)
        padded, plain = sess.run([padded, plain])
    for row in range(3):
        np.testing.assert_array_equal(padded["tokens"][row], plain["tokens"][0])
        np.testing.assert_allclose(padded["values"][row], plain["values"][0], atol=1e-5)


def test_same_seeds_same_samples():
    def run():
        with tf.Graph().as_default():
            tf.set_random_seed(7)
            model = make_model()
            sampled = sample.sample_sequence(model, length=6, context=CONTEXT, padding_token=PAD, seed=3)
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                randomize(sess)
                return sess.run(sampled["tokens"]), sess.run(sampled["tokens"])
    (first, second), (again, _) = run(), run()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)  # a second draw in one session is a new sample


def test_length_can_be_a_tensor():
    model = make_model()
    length = tf.placeholder(tf.int32, [])
    sampled = sample.sample_sequence(model, length=length, context=CONTEXT, padding_token=PAD)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        assert sess.run(sampled["tokens"], {length: 1}).shape == (3, 1)
        assert sess.run(sampled["tokens"], {length: 4}).shape == (3, 4)


@pytest.mark.parametrize("options, message", [
    (dict(length=0), "length must be at least 1"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_bad_options(options, message):
    model = make_model()
    kwargs = {"length": 3, "context": CONTEXT, "padding_token": PAD, **options}
    with pytest.raises(ValueError, match=message):
        sample.sample_sequence(model, **kwargs)


# ----- ./sample.py sample ----------------------------------------------------------------------------------------

from test_launch import load_script  # noqa: E402
from test_train_policy import write_2019_style_run  # noqa: E402  (a run directory without training one)

from lm_human_preferences import launcher  # noqa: E402
from lm_human_preferences.language.trained_models import TrainedModel  # noqa: E402
from lm_human_preferences.policy import Policy  # noqa: E402
from lm_human_preferences.utils import mpi  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_SEPARATOR = "=" * 80 + "\n"


sample_cli = load_script("sample.py")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny run directory of the `test` model whose task samples at temperature 0.7."""
    run_dir = tmp_path_factory.mktemp("run")
    with tf.Graph().as_default():
        write_2019_style_run(str(run_dir))
    return str(run_dir)


def run_sample_py(*argv, env=None, timeout=300):
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **(env or {}))
    return subprocess.run([sys.executable, "sample.py", "sample", *argv], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_sample_py_has_the_2019_defaults():
    defaults = {name: parameter.default for name, parameter in inspect.signature(sample_cli.sample).parameters.items()}
    assert (defaults["temperature"], defaults["batch_size"], defaults["nsamples"]) == (1.0, 4, 0)  # 0: forever
    assert defaults["mpi"] is None  # one rank per visible GPU


def test_sample_py_samples_at_temperature_1_by_default(saved_run):
    result = run_sample_py("--save_dir", saved_run, "--nsamples", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(SAMPLE_SEPARATOR) == 2
    assert "--mpi not given: 1 rank (no GPU found)" in result.stderr
    assert f"sampling policy of {saved_run} at temperature 1 (--temperature), 2 samples" in result.stderr


def test_temperature_task_is_the_runs_task_temperature(saved_run, capsys, monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: [])
    sample_cli.sample(saved_run, temperature="task", nsamples=3, batch_size=2)
    captured = capsys.readouterr()
    assert captured.out.count(SAMPLE_SEPARATOR) == 3
    assert "at temperature 0.7 (the run's task.policy.temperature), 3 samples" in captured.err


def test_a_run_whose_task_temperature_is_not_positive_is_refused_before_sampling(saved_run, tmp_path, capsys,
                                                                                  monkeypatch):
    """--temperature task samples at the run's task.policy.temperature: checked as when the run started."""
    run = shutil.copytree(saved_run, tmp_path / "run")
    path = run / "train_policy_hparams.json"
    hparams = json.loads(path.read_text())
    hparams["task"]["policy"]["temperature"] = 0
    path.write_text(json.dumps(hparams))
    monkeypatch.setattr(launcher, "visible_gpus", lambda: [])
    with pytest.raises(ValueError, match=re.escape(f"{path}: task.policy.temperature must be > 0, got 0.0")):
        sample_cli.sample(str(run), temperature="task", nsamples=1)
    assert capsys.readouterr().out == ""


def test_two_ranks_share_the_samples(saved_run):
    """--mpi 2 starts two ranks of sample.py under mpiexec; each joins that job (it starts nothing more)."""
    result = run_sample_py("--save_dir", saved_run, "--nsamples", "4", "--mpi", "2", "--temperature", "task")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(SAMPLE_SEPARATOR) == 4
    assert result.stderr.count("at temperature 0.7 (the run's task.policy.temperature), 4 samples") == 1


def fake_policy_run(directory):
    """The files sample.py checks before starting ranks: a train_policy run with a policy scope."""
    os.makedirs(os.path.join(directory, "policy"))
    for name in ("train_policy_hparams.json", "policy/hparams.json"):
        with open(os.path.join(directory, name), "w") as f:
            f.write("{}")
    return str(directory)


def test_mpi_defaults_to_one_rank_per_visible_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: ["0", "1"])
    calls = []
    monkeypatch.setattr(launcher, "call_mpiexec", lambda argv, env: calls.append(argv) or 0)
    run_dir = fake_policy_run(tmp_path / "run")
    with pytest.raises(SystemExit) as info:
        sample_cli.sample(run_dir, temperature="task", seed=3)
    assert info.value.code == 0
    [argv] = calls
    assert argv[:len(mpi.mpiexec_command(2))] == mpi.mpiexec_command(2)
    assert argv[len(mpi.mpiexec_command(2)):] == [
        sys.executable, os.path.join(REPO_ROOT, "sample.py"), "sample", f"--save_dir={run_dir!r}",
        "--savescope='policy'", "--nsamples='0'", "--batch_size='4'", "--temperature='task'", "--seed='3'",
        "--mpi='2'"]


def test_inside_an_outer_mpi_job_sample_py_starts_no_ranks(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--mpi 4 disagrees with the outer MPI job of 2 ranks that started this "
                                         r"sample.py"):
        sample_cli.sample("/some/run", mpi=4)


@pytest.mark.parametrize("flags, message", [
    (dict(temperature=0), r"--temperature: got 0, expected a positive number or 'task' \(the run's "
                          r"task.policy.temperature\)"),
    (dict(temperature="hot"), r"--temperature: got 'hot', expected a positive number or 'task'"),
    (dict(nsamples=-1), r"--nsamples: got -1, expected 0 \(forever\) or a positive integer"),
    (dict(batch_size=0), r"--batch_size: got 0, expected a positive integer"),
    (dict(mpi=0), r"--mpi: got 0, expected a positive integer"),
])
def test_sample_py_user_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        sample_cli.sample("/some/run", **flags)


E = 4  # the `test` encoding's id of "e"


def make_policy_say_only(run_dir, token):
    """Save a later policy checkpoint in a run, whose next token is `token` almost surely: the final layer norm gives
    the constant h (gain 0, bias h, |h| = 1) and the output embedding of `token` is 100 h, a logit of 100 against
    |logit| < 1 for every other token (the initial `test` model has small random weights). The earlier checkpoint
    stays, as in a run that saved twice."""
    checkpoints = os.path.join(run_dir, "policy", "checkpoints")
    earlier = tf.train.latest_checkpoint(checkpoints)
    with tf.Graph().as_default():
        policy = Policy(TrainedModel("policy", savedir=os.path.join(run_dir, "policy"), scope="policy"),
                        scope="policy")
        params = {v.op.name: v for v in policy.get_params()}
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            wte = sess.run(params["policy/model/wte"])  # [n_vocab, n_embd]
            h = np.ones(wte.shape[1], np.float32) / np.sqrt(wte.shape[1])
            wte[token] = 100 * h
            params["policy/model/wte"].load(wte, sess)
            params["policy/model/ln_f/g"].load(np.zeros_like(h), sess)
            params["policy/model/ln_f/b"].load(h, sess)
            assert np.abs(np.delete(wte, token, axis=0) @ h).max() < 1  # the other tokens' logits
            saver = tf.train.Saver(policy.get_params(), save_relative_paths=True)
            saver.recover_last_checkpoints([earlier])
            saver.save(sess, os.path.join(checkpoints, "model.ckpt"), global_step=2000, write_meta_graph=False)


def sampled_responses(printed):
    """The response lines of sample.py's output: separator, query, response for each sample."""
    blocks = printed.split(SAMPLE_SEPARATOR)[1:]
    return [block.split("\n")[1] for block in blocks]


def test_sample_py_samples_the_saved_policy_not_the_initial_model(tmp_path, saved_run, capsys, monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", list)
    run_dir = str(tmp_path / "run")
    with tf.Graph().as_default():
        write_2019_style_run(run_dir)  # the saved policy holds the initial `test` model's weights ...
    make_policy_say_only(run_dir, E)  # ... until a later checkpoint says "e" and nothing else
    sample_cli.sample(run_dir, nsamples=8, batch_size=4)
    responses = sampled_responses(capsys.readouterr().out)
    assert responses == ["eeee"] * 8  # response_length 4 of the run's task
    # the same command on a run that saved the initial model's weights says other things
    sample_cli.sample(saved_run, nsamples=8, batch_size=4)
    responses = sampled_responses(capsys.readouterr().out)
    assert len(responses) == 8 and responses != ["eeee"] * 8 and all(len(r) == 4 for r in responses), responses


@pytest.mark.parametrize("where, expected", [
    ("nosuch", "there is no such directory"),
    ("", "it holds the train_policy runs run: pass one of them"),  # the parent of a run
    ("run/policy", "it holds hparams.json"),
    ("reward_run", "it holds a train_reward run, whose reward model scores text but samples nothing"),
])
def test_a_save_dir_that_is_no_policy_run_says_what_it_found(tmp_path, where, expected):
    fake_policy_run(tmp_path / "run")
    os.makedirs(tmp_path / "reward_run")
    (tmp_path / "reward_run" / "train_reward_hparams.json").write_text("{}")
    path = str(tmp_path / where)
    with pytest.raises(ValueError) as info:
        sample_cli.sample(path, nsamples=1)
    assert str(info.value) == (f"--save_dir {path}: expected a train_policy run directory (holding "
                               f"train_policy_hparams.json and policy/); {expected}")


def test_savescope_must_name_a_policy_of_the_run(tmp_path):
    run_dir = fake_policy_run(tmp_path / "run")
    os.makedirs(tmp_path / "run" / "reward_model")
    (tmp_path / "run" / "reward_model" / "hparams.json").write_text("{}")
    with pytest.raises(ValueError) as info:
        sample_cli.sample(run_dir, savescope="reward_model", nsamples=1)
    assert str(info.value) == f"--savescope reward_model: the run's reward model, not a policy; the policy scopes " \
                              f"of {run_dir}: policy"
    with pytest.raises(ValueError, match="--savescope ref_policy: not saved in this run; the policy scopes"):
        sample_cli.sample(run_dir, savescope="ref_policy", nsamples=1)
