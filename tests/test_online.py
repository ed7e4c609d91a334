"""Online labels during PPO (paper section 2.3, online_labels.py): rounds on the paper's schedule, a reward model that
catches up with the current policy, labels kept across a stop and --resume, people labelling a round in the web
app while PPO waits, and clear errors for settings that cannot work."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import lm_human_preferences
from lm_human_preferences import (experiments, label_app, labeler, label_types, lm_tasks, online_labels, train_policy,
                                  train_reward)
from lm_human_preferences import trainer as run_utils
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.utils import stats
from lm_human_preferences.utils.hyperparams import HParamError

JUDGE = labeler.get_judge("letter_e")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The `test` experiment on the small `demo` model: 12 PPO updates of 32 episodes; 32 labels before PPO, then a round
# every 128 episodes (updates 4 and 8) on the way to 512 labels.
SETTINGS = {
    "task.query_length": 4, "task.response_length": 8, "task.policy.initial_model": "demo",
    "ppo.total_episodes": 384, "ppo.batch_size": 32, "ppo.lr": 3e-3, "rewards.kl_coef": 0.01,
    "rewards.train_new_model.batch_size": 16, "rewards.train_new_model.lr": 3e-3,
    "rewards.train_new_model.normalize_samples": 64, "rewards.train_new_model.rollout_batch_size": 32,
    "labels.online": "on", "labels.online.judge": "letter_e", "labels.online.initial_labels": 32,
    "labels.online.total_labels": 512, "labels.online.episodes_between_rounds": 128,
    "run.log_interval": 1000, "run.save_interval": 1000,
}


def online_hparams(save_dir, name="run", **overrides):
    return experiments.resolve_hparams("train_policy", "test", name, save_dir=str(save_dir),
                                       overrides={**SETTINGS, **overrides})


def scheduled_labels(settings):
    """[(PPO update, labels held after the round)], from the paper's l(n) written out here independently:
    l(n) = N0 + (N - N0)(1 - (1 - n / N_pi)^2), rounded up to whole reward batches, before updates 0, E/B, 2E/B, ..."""
    total, batch = settings["ppo.total_episodes"], settings["ppo.batch_size"]
    n0, n = settings["labels.online.initial_labels"], settings["labels.online.total_labels"]
    every = settings["labels.online.episodes_between_rounds"]
    reward_batch = settings["rewards.train_new_model.batch_size"]
    result = []
    for update in range(0, total // batch, every // batch):  # E is a multiple of B here
        wanted = n0 + (n - n0) * (1 - (1 - update * batch / total) ** 2)
        result.append((update, min(n, reward_batch * math.ceil(wanted / reward_batch))))
    return result


def agreement_with_judge(trainer, seed, count=512):
    """How often the reward model orders two fresh samples of the CURRENT policy as the judge does (pairs the judge
    finds equal left out)."""
    queries = next(lm_tasks.query_batches(trainer.hparams.task, trainer.encoder, count, mode="test", seed=seed,
                                          rank=0, size=1))
    a, b = (trainer.current_policy_samples(queries, run_utils.stateless_seed(seed, k)) for k in (1, 2))
    reward_a, reward_b = (trainer.sess.run(trainer.score_op, {trainer.queries: queries, trainer.scored_responses: r})
                          for r in (a, b))
    judge_a, judge_b = (labeler.judge_scores(JUDGE, trainer.encoder, queries, r) for r in (a, b))
    decided = judge_a != judge_b
    return float(np.mean(np.sign(reward_b - reward_a)[decided] == np.sign(judge_b - judge_a)[decided]))


def scalars(save_dir, tag, kind="ppo"):
    return stats.read_scalars(os.path.join(save_dir, "tb", kind)).get(tag, [])


def read_labels(save_dir):
    with open(os.path.join(save_dir, online_labels.LABELS_FILE)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """An online run that a SIGTERM stops in the middle of round 2 (while its reward model retrains, after 3 of the
    retraining's steps were logged) and --resume then finishes. Around each round, the reward model's agreement with
    the judge on fresh samples of the current policy is measured before and after it: {round: (before, after)};
    `labelled`: the labels the judge made in each part, `stopped`: the label file when the run stopped,
    `stopped_steps`: the reward model's TensorBoard steps then."""
    hparams = online_hparams(tmp_path_factory.mktemp("online"), "run")
    agreement, labelled = {}, [[], []]
    run_round, make_records = online_labels.OnlineLabels.run_round, labeler.make_records
    train_step = train_reward._train_step
    round_2_starts = (32 + 304) // 16  # the reward-model step (TensorBoard's) where round 2's retraining begins

    def measured(self, round, **kwargs):
        trainer = kwargs["sample"].__self__  # the PPO trainer whose policy samples the round
        before = agreement_with_judge(trainer, 1000 + round.index)
        result = run_round(self, round, **kwargs)
        agreement[round.index] = (before, agreement_with_judge(trainer, 1000 + round.index))
        return result

    def judged(label_type, queries, *args, **kwargs):
        labelled[part].append(len(queries))
        return make_records(label_type, queries, *args, **kwargs)

    def stepped(*args, log_step=None, **kwargs):
        train_step(*args, log_step=log_step, **kwargs)
        if part == 0 and log_step == round_2_starts + 2:  # round 2 is retraining: a scheduler's SIGTERM arrives
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(online_labels.OnlineLabels, "run_round", measured)
        patch.setattr(labeler, "make_records", judged)
        patch.setattr(train_reward, "_train_step", stepped)
        part = 0
        with tf.Graph().as_default(), pytest.raises(run_utils.RunInterrupted, match="stopped after update 8 of 12"):
            train_policy.train(hparams)
        stopped = read_labels(hparams.run.save_dir)
        stopped_steps = [step for step, _ in
                         scalars(hparams.run.save_dir, "train_reward/minibatch/loss", "reward_model")]
        part = 1
        with tf.Graph().as_default():
            train_policy.train(hparams, resume=True)
    return types.SimpleNamespace(hparams=hparams, agreement=agreement, labelled=labelled, stopped=stopped,
                                 stopped_steps=stopped_steps)


def test_rounds_come_on_the_papers_schedule_and_the_label_count_grows_as_scheduled(online_run):
    save_dir = online_run.hparams.run.save_dir
    expected = scheduled_labels(SETTINGS)
    assert expected == [(0, 32), (4, 304), (8, 464)]  # front-loaded: 272 new labels, then 160
    assert [(step, int(value)) for step, value in scalars(save_dir, "online/labels")] == expected
    assert [int(v) for _, v in scalars(save_dir, "online/new_labels")] == [32, 272, 160]
    # how stale the reward model had become: measured on each later round's new labels, before retraining
    assert [step for step, _ in scalars(save_dir, "online/accuracy_before_retrain")] == [4, 8]
    # every label is kept, in the released format (usable as --labels.source), with its round
    records = read_labels(save_dir)
    assert [sum(r["round"] == k for r in records) for k in range(3)] == [32, 272, 160]
    label_types.load_labels(os.path.join(save_dir, online_labels.LABELS_FILE), label_types.get("best_of_4"),
                            query_length=4, response_length=8, encoding=TrainedModel("demo").encoding)
    assert len({tuple(r["query"]) for r in records}) > 0.9 * len(records)  # each label has a query of its own
    # each retraining is one epoch over all labels so far; their TensorBoard steps follow one another, each once:
    # the resumed run retrained round 2 from its start, and what the stopped run had logged of it is void
    steps = [step for step, _ in scalars(save_dir, "train_reward/minibatch/loss", "reward_model")]
    assert steps == list(range((32 + 304 + 464) // 16))
    # PPO ran all its updates against the retrained reward model, saved where 2019 saved one
    assert [step for step, _ in scalars(save_dir, "objective/score")] == list(range(12))
    assert os.path.exists(os.path.join(save_dir, "reward_model", "checkpoints", "model.ckpt.index"))
    with open(os.path.join(save_dir, "train_policy_hparams.json")) as f:
        assert json.load(f)["rewards"]["trained_model"] == os.path.join(save_dir, "reward_model")


def test_after_a_round_the_reward_model_agrees_better_with_the_judge_on_current_policy_samples(online_run):
    agreement = online_run.agreement
    # Measured: round 1 0.63 -> 0.79, round 2 0.85 -> 1.0 (chance 0.5) on about 450 decided pairs each.
    for round_index in (1, 2):
        before, after = agreement[round_index]
        assert after > before + 0.08, agreement


def test_a_stop_during_a_round_keeps_its_labels_and_resume_collects_only_what_is_missing(online_run):
    # the run stopped while retraining in round 2 (3 of its steps logged), after that round's labels were saved:
    # none is lost ...
    assert online_run.stopped_steps == list(range((32 + 304) // 16 + 3))
    assert [sum(r["round"] == k for r in online_run.stopped) for k in range(3)] == [32, 272, 160]
    assert online_run.labelled[0] == [32, 272, 160]
    # ... nor labelled twice: the resumed run retrained on them and went on
    assert online_run.labelled[1] == []
    assert read_labels(online_run.hparams.run.save_dir) == online_run.stopped
    state = tf.train.load_checkpoint(os.path.join(online_run.hparams.run.save_dir, "resume", "ppo"))
    assert state.get_tensor("run_state_ppo/online_rounds") == 3 and state.get_tensor("run_state_ppo/update") == 12
    # a round saves the resume state only (also when the run stops in one): the one policy checkpoint is the end's
    checkpoints = os.listdir(os.path.join(online_run.hparams.run.save_dir, "policy", "checkpoints"))
    assert sorted(name for name in checkpoints if name.endswith(".index")) == ["model.ckpt-12.index"], checkpoints


def test_two_ranks_label_online_and_end_with_identical_policy_and_reward_model(tmp_path):
    """rank 0 labels each round; every rank retrains the reward model on those labels and the runs stay equal."""
    flags = ["--task.query_length", "4", "--task.response_length", "8", "--task.policy.initial_model", "demo",
             "--ppo.total_episodes", "64", "--ppo.batch_size", "16", "--rewards.train_new_model.batch_size", "16",
             "--rewards.train_new_model.normalize_samples", "32", "--rewards.train_new_model.rollout_batch_size", "16",
             "--labels.online", "on", "--labels.online.judge", "letter_e", "--labels.online.initial_labels", "32",
             "--labels.online.total_labels", "96", "--labels.online.episodes_between_rounds", "32"]
    result = subprocess.run([sys.executable, "launch.py", "train_policy", "test", "two", "--mpi", "2",
                             "--save_dir", str(tmp_path), *flags], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stdout[-3000:]
    # rounds at updates 0 and 2 of 4 (32 episodes apart): 32 labels, then 48 of the 64 still to come
    assert [int(v) for _, v in scalars(tmp_path / "two", "online/new_labels")] == [32, 48]
    assert len(read_labels(tmp_path / "two")) == 80
    assert "online labels: 32 before PPO starts, then 1 round (labels held after each: 80 at update 2)" in result.stdout
    assert "policy parameters identical on all 2 ranks" in result.stdout
    assert "reward model parameters identical on all 2 ranks" in result.stdout


class FakeLabelApp:
    """Stands in for label_app (the browser is tested with the app itself): people who prefer e's answer every
    item, except that on `interrupt_at` call a SIGTERM arrives half way, which must raise KeyboardInterrupt there,
    as the app's collect_labels expects (it exports the labels so far, then re-raises)."""

    def __init__(self, interrupt_at=None):
        self.calls, self.interrupt_at = [], interrupt_at

    def collect_labels(self, items, label_type_name, output, **options):
        self.calls.append(dict(items=items, label_type=label_type_name, output=output, **options))
        queries = np.array([item["query"] for item in items])
        samples = [np.array([item[name] for item in items]) for name in sorted(items[0]) if name != "query"]
        records = labeler.make_records(label_type_name, queries, samples, JUDGE, options["encoder"], 0.0,
                                       np.random.RandomState(0))
        if len(self.calls) == self.interrupt_at:
            records = records[:len(records) // 2]
        labeler.write_label_file(output, records)
        if len(self.calls) == self.interrupt_at:  # a scheduler's SIGTERM while people label ends the serving
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
            raise AssertionError("the stop signal did not interrupt the serving")
        return records


def install(monkeypatch, app):
    module = types.ModuleType("lm_human_preferences.label_app")
    module.collect_labels = app.collect_labels
    module.interrupt_on = label_app.interrupt_on  # the real one: a stop signal must still end the serving
    monkeypatch.setitem(sys.modules, "lm_human_preferences.label_app", module)
    monkeypatch.setattr(lm_human_preferences, "label_app", module, raising=False)


def test_people_label_each_round_in_the_web_app_while_ppo_waits_and_a_restart_serves_the_same_items(
        tmp_path, monkeypatch):
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("Pick the continuation with the most e's.")
    settings = {"ppo.total_episodes": 96, "labels.online.judge": "human", "labels.online.type": "best_of_2",
                "labels.online.initial_labels": 16,
                "labels.online.total_labels": 64, "labels.online.episodes_between_rounds": 32,
                "labels.online.port": 8123, "labels.online.overlap": 0.1, "labels.online.token": "secret-token",
                "labels.online.instructions": str(instructions)}
    hparams = online_hparams(tmp_path, "people", **settings)
    interrupted = FakeLabelApp(interrupt_at=2)
    install(monkeypatch, interrupted)
    with tf.Graph().as_default(), pytest.raises(run_utils.RunInterrupted, match="stopped after update 1 of 3"):
        train_policy.train(hparams)
    first, second = interrupted.calls
    save_dir = hparams.run.save_dir
    assert first["output"] == os.path.join(save_dir, "online", "round_00.json")
    assert second["output"] == os.path.join(save_dir, "online", "round_01.json")
    assert second["made_by"]["update"] == 1  # PPO waited after its first update for round 1's labels
    assert (second["host"], second["port"], second["token"], second["overlap"]) == ("127.0.0.1", 8123,
                                                                                    "secret-token", 0.1)
    assert second["instructions"] == "Pick the continuation with the most e's." and second["label_type"] == "best_of_2"
    assert len(first["items"]) == 16 and set(first["items"][0]) == {"query", "sample0", "sample1"}
    assert [len(first["items"][0]["query"]), len(first["items"][0]["sample0"])] == [4, 8]
    assert [r["round"] for r in read_labels(save_dir)] == [0] * 16  # round 1's half is in the app's files only

    resumed = FakeLabelApp()
    install(monkeypatch, resumed)
    with tf.Graph().as_default():
        train_policy.train(hparams, resume=True)
    assert resumed.calls[0]["items"] == second["items"]  # the same policy samples the same items: the app resumes
    assert [(step, int(v)) for step, v in scalars(save_dir, "online/labels")] == scheduled_labels(
        {**SETTINGS, **settings}) == [(0, 16), (1, 48), (2, 64)]
    assert [sum(r["round"] == k for r in read_labels(save_dir)) for k in range(3)] == [16, 32, 16]


def test_a_human_round_is_served_by_the_real_web_app_and_the_answers_become_the_runs_labels(tmp_path):
    import requests  # the web app's own tests drive it in a browser; here a script answers through its API

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    hparams = online_hparams(tmp_path, "people", **{
        "ppo.total_episodes": 96, "labels.online.judge": "human", "labels.online.initial_labels": 16,
        "labels.online.total_labels": 64, "labels.online.episodes_between_rounds": 32, "labels.online.port": port})
    answers, done = [], threading.Event()

    def person():  # prefers the sample with the most e's, as the page shows it (decoded text)
        url = f"http://127.0.0.1:{port}/api"
        while not done.is_set():
            try:
                task = requests.get(f"{url}/task", params={"labeler": "ann"}, timeout=5)
            except requests.ConnectionError:  # between rounds, PPO trains and nothing serves
                task = None
            if task is None or task.status_code != 200:
                time.sleep(0.1)
                continue
            task = task.json()
            best = int(np.argmax([sample.count("e") for sample in task["samples"]]))
            answer = requests.post(f"{url}/label", json={"id": task["id"], "labeler": "ann", "best": best}, timeout=5)
            assert answer.status_code == 200, answer.text
            answers.append((task["samples"], best))

    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    try:
        with tf.Graph().as_default():
            train_policy.train(hparams)
    finally:
        done.set()
        thread.join()
    records = read_labels(hparams.run.save_dir)
    assert len(answers) == len(records) == 64
    assert [sum(r["round"] == k for r in records) for k in range(3)] == [16, 32, 16]
    decoder = TrainedModel("demo").encoding.get_encoder()
    assert sorted((tuple(decoder.decode(r[f"sample{k}"]) for k in range(4)), r["best"]) for r in records) == sorted(
        (tuple(samples), best) for samples, best in answers)


# ----- the schedule, the registry and errors -------------------------------------------------------------------

def test_the_schedule_is_the_papers_l_of_n_with_retrainings_at_evenly_spaced_episodes():
    online = online_labels.OnlineLabelHParams(initial_labels=4_992, total_labels=60_000,
                                              episodes_between_rounds=50_000, judge="human")
    ppo = train_policy.PpoHParams(total_episodes=1_000_000, batch_size=32)
    rounds = online_labels.schedule(online, ppo, reward_batch_size=16)
    assert len(rounds) == 20  # trained before PPO, then 19 more times (paper 2.3)
    assert [r.update for r in rounds] == [math.ceil(k * 50_000 / 32) for k in range(20)]
    for r in rounds:
        wanted = 4_992 + (60_000 - 4_992) * (1 - (1 - r.episodes / 1_000_000) ** 2)
        assert r.labels % 16 == 0 and wanted <= r.labels < wanted + 16
    added = np.diff([r.labels for r in rounds])
    assert np.all(added > 0) and np.all(np.diff(added) <= 0)  # front-loaded: every round adds fewer labels


def test_online_labels_are_off_in_every_registered_experiment_but_demo_online():
    for name in ("sentiment", "descriptiveness", "cnndm", "tldr", "test", "demo"):
        assert experiments.resolve_hparams("train_policy", name, "x").labels.online is None, name
    online = experiments.resolve_hparams("train_policy", "demo_online", "x")
    demo = experiments.resolve_hparams("train_policy", "demo", "x")
    assert online.labels.online.judge == "letter_e" and online.labels.online.initial_labels == 512
    online.labels.online = None
    assert online.to_nested_dict() == demo.to_nested_dict()  # the demo, with online labels switched on


@pytest.mark.parametrize("overrides, message", [
    ({"labels.online.judge": "oracle"}, "labels.online.judge: unknown judge 'oracle'; known judges: letter_X"),
    ({"labels.online.judge": None}, "labels.online.judge is required"),
    ({"labels.online.initial_labels": 0}, "labels.online.initial_labels must be positive, got 0"),
    ({"labels.online.total_labels": 32},
     "labels.online.total_labels=32 must exceed labels.online.initial_labels=32"),
    ({"labels.online.initial_labels": 24},
     "labels.online.initial_labels=24 must be a multiple of rewards.train_new_model.batch_size=16"),
    ({"labels.online.episodes_between_rounds": 16},
     "labels.online.episodes_between_rounds=16 must be at least ppo.batch_size=32"),
    ({"labels.online.episodes_between_rounds": 384},
     "labels.online.episodes_between_rounds=384 leaves no round within ppo.total_episodes=384"),
    ({"labels.online.type": "best_of_1"}, "labels.online.type: unknown label type 'best_of_1'"),
    ({"labels.online.judge_temperature": -1}, "labels.online.judge_temperature must be >= 0"),
    ({"labels.online.overlap": 1.5}, "labels.online.overlap must be a fraction in [0, 1], got 1.5"),
    ({"labels.online.port": 70000}, "labels.online.port must be a TCP port 0..65535"),
    ({"rewards.train_new_model": "off", "rewards.trained_model": "/some/reward_model"},
     "labels.online retrains the reward model with the recipe of rewards.train_new_model"),
])
def test_bad_online_settings_are_refused_with_the_hyperparameter_named(tmp_path, overrides, message):
    settings = {**SETTINGS, **overrides}
    if overrides.get("rewards.train_new_model") == "off":  # its fields would switch it on again
        settings = {name: value for name, value in settings.items() if not name.startswith("rewards.train_new_model.")}
    with pytest.raises(HParamError) as info:
        experiments.resolve_hparams("train_policy", "test", "run", save_dir=str(tmp_path), overrides=settings)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not os.listdir(tmp_path)


def test_a_human_judged_run_without_the_web_app_stops_before_anything_is_written(tmp_path, monkeypatch):
    hparams = online_hparams(tmp_path, **{"labels.online.judge": "human"})
    monkeypatch.setitem(sys.modules, "lm_human_preferences.label_app", None)  # the import fails
    monkeypatch.delattr(lm_human_preferences, "label_app", raising=False)
    with pytest.raises(ValueError, match="labels.online.judge human serves the rounds in the labeling web app"):
        train_policy.train(hparams)
    assert not os.path.exists(hparams.run.save_dir)


def test_each_retraining_restarts_the_reward_model_from_the_initial_model_with_a_fresh_head():
    model = TrainedModel("test")
    ref_policy = Policy(model, scope="ref_policy")
    reward_model = RewardModel(model, scope="reward_model")
    seed = tf.placeholder(tf.int64, [2])
    restart = online_labels.restart_from_initial_model(reward_model, ref_policy, seed)
    params = {v.op.name: v for v in tf.global_variables()}
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        for variable in reward_model.get_params():  # where an earlier round left it
            sess.run(variable.assign(variable + 0.5))
        sess.run(restart, {seed: [1, 2]})
        values = {name: sess.run(variable) for name, variable in params.items()}
        sess.run(restart, {seed: [1, 3]})
        other_head = sess.run(params["reward_model/model/heads/reward/w"])
    for name in values:
        if name.startswith("ref_policy/model/") and "/heads/" not in name:  # the trunk: the initial model's
            np.testing.assert_array_equal(values[name.replace("ref_policy/", "reward_model/", 1)], values[name])
    head = values["reward_model/model/heads/reward/w"]  # a fresh random head, as a new one is drawn
    assert head.shape == (7,) and 0 < head.std() < 3 / np.sqrt(8) and not np.array_equal(head, other_head)
    assert values["reward_model/model/heads/reward/b"] == 0
    assert (values["reward_model/reward_norm/gain"], values["reward_model/reward_norm/bias"]) == (1, 0)


def test_an_online_runs_rounds_draw_with_the_policy_runs_seed_not_its_nested_reward_models(tmp_path):
    """A sweep's trials differ in run.seed while their nested reward model keeps its own (seed 1): each trial's
    rounds (label samples, judge noise, shuffles, head restarts, all keyed on OnlineLabels.seed) follow its own
    run seed, and the seed a resumed run restores is that one too."""
    hparams = online_hparams(tmp_path, "run", **{"run.seed": 7})
    assert hparams.rewards.train_new_model.run.seed == 1
    model = TrainedModel(hparams.task.policy.initial_model)
    with tf.Graph().as_default():
        trainer = train_policy.PPOTrainer(hparams, model, model, model.encoding.get_encoder())
        assert trainer.seed == 7 and trainer.online.seed == 7
