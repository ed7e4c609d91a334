"""The trainers' hyperparameter rules (lm_human_preferences/hparams.py), each at its edge: the last accepted value
passes and the first refused one fails with its whole message. No TensorFlow; the `test` experiments are the base."""

import pytest

from lm_human_preferences import experiments
from lm_human_preferences.hparams import (BatchSizes, ModelHParams, OnlineLabelHParams, PpoHParams, batch_sizes,
                                          check_online)
from lm_human_preferences.utils.hyperparams import HParamError

SAVE_DIR = "/nowhere/run"
ONLINE = {"labels.online.initial_labels": 8, "labels.online.total_labels": 16,
          "labels.online.episodes_between_rounds": 8, "labels.online.judge": "letter_e"}


def resolved(command, overrides, prefix=""):
    """The `test` experiment of `command` with `overrides` applied, then validated with `prefix`."""
    hparams = experiments.resolve_hparams(command, "test", "run", save_dir="/nowhere")
    return hparams.override_from_dict(overrides).validate(prefix)


def refusal(command, overrides, prefix=""):
    with pytest.raises(HParamError) as error:
        resolved(command, overrides, prefix)
    return str(error.value)


# (command, overrides at the last accepted value, overrides at the first refused one, the whole message)
EDGES = [
    # train_reward
    ("train_reward", {"batch_size": 1}, {"batch_size": 0}, "batch_size must be positive, got 0"),
    ("train_reward", {"lr": 0.0}, {"lr": -1e-9}, "lr must be >= 0, got -1e-09"),
    ("train_reward", {"labels.num_train": 1, "batch_size": 1}, {"labels.num_train": 0},
     "labels.num_train must be positive, got 0"),
    ("train_reward", {"labels.num_train": 24}, {"labels.num_train": 12},
     "labels.num_train=12 must be a multiple of batch_size=8 (one pass over the labels in whole batches)"),
    ("train_reward", {"labels.num_valid": 0}, {"labels.num_valid": -1}, "labels.num_valid must be >= 0, got -1"),
    ("train_reward", {"labels.judge_temperature": 0.0}, {"labels.judge_temperature": -0.5},
     "labels.judge_temperature must be >= 0, got -0.5"),
    ("train_reward", {"labels.judge": None, "labels.source": "labels.json"}, {"labels.judge": None},
     "labels.source is required (a label file: path, https:// or gs:// URL); or set labels.judge to label with a "
     "synthetic judge (offline demo)"),
    ("train_reward", {"rollout_batch_size": 1}, {"rollout_batch_size": 0}, "rollout_batch_size must be positive, got 0"),
    ("train_reward", {"normalize_before": False, "normalize_after": False, "normalize_samples": 0},
     {"normalize_before": False, "normalize_after": False, "normalize_samples": -1}, "normalize_samples must be >= 0"),
    ("train_reward", {"normalize_before": True, "normalize_after": False, "normalize_samples": 1},
     {"normalize_before": True, "normalize_after": False, "normalize_samples": 0},
     "normalize_before/normalize_after need normalize_samples > 0"),
    ("train_reward", {"normalize_before": False, "normalize_after": True, "normalize_samples": 1},
     {"normalize_before": False, "normalize_after": True, "normalize_samples": 0},
     "normalize_before/normalize_after need normalize_samples > 0"),
    ("train_reward", {"run.save_dir": "gs://bucket/run"}, {"run.save_dir": "https://host/run"},
     "run.save_dir='https://host/run': a run is saved to a local directory or a gs:// URL; https:// locations are "
     "read-only"),
    ("train_reward", {"run.save_dir": None}, {"run.save_dir": "http://host/run"},
     "run.save_dir='http://host/run': a run is saved to a local directory or a gs:// URL; https:// locations are "
     "read-only"),
    # PPO
    *[("train_policy", {f"ppo.{name}": 1}, {f"ppo.{name}": 0}, f"ppo.{name} must be positive, got 0")
      for name in ("total_episodes", "batch_size", "nminibatches", "noptepochs", "micro_batches")],
    ("train_policy", {"ppo.lr": 0.0}, {"ppo.lr": -1e-9}, "ppo.lr must be >= 0, got -1e-09"),
    ("train_policy", {"ppo.vf_coef": 0.0}, {"ppo.vf_coef": -0.1}, "ppo.vf_coef must be >= 0, got -0.1"),
    *[("train_policy", {f"ppo.{name}": 0.0}, {f"ppo.{name}": -0.01}, f"ppo.{name} must be in [0, 1], got -0.01")
      for name in ("gamma", "lam")],
    *[("train_policy", {f"ppo.{name}": 1.0}, {f"ppo.{name}": 1.01}, f"ppo.{name} must be in [0, 1], got 1.01")
      for name in ("gamma", "lam")],
    *[("train_policy", {f"ppo.{name}": 0.01}, {f"ppo.{name}": 0.0}, f"ppo.{name} must be positive, got 0.0")
      for name in ("cliprange", "cliprange_value")],
    # the KL controller and the reward model's source
    ("train_policy", {"rewards.adaptive_kl.target": 0.5}, {"rewards.adaptive_kl.target": 0.0},
     "rewards.adaptive_kl.target must be positive (nats), got 0.0"),
    ("train_policy", {"rewards.adaptive_kl.target": 6.0, "rewards.adaptive_kl.horizon": 1},
     {"rewards.adaptive_kl.target": 6.0, "rewards.adaptive_kl.horizon": 0},
     "rewards.adaptive_kl.horizon must be positive (episodes), got 0"),
    ("train_policy", {"rewards.train_new_model": "off", "rewards.trained_model": "/runs/reward"},
     {"rewards.trained_model": "/runs/reward"},
     "set exactly one of rewards.trained_model and rewards.train_new_model (to use a saved reward model: "
     "--rewards.train_new_model off --rewards.trained_model PATH)"),
    ("train_policy", {"rewards.train_new_model.run.save_dir": "/nowhere/run"},
     {"rewards.train_new_model.run.save_dir": "/elsewhere"},
     "rewards.train_new_model.run.save_dir='/elsewhere': the reward model a policy run trains first is saved in the "
     "run's own directory, as SAVE_DIR/reward_model (run.save_dir='/nowhere/run'); choose the directory with "
     "--save_dir (or --run.save_dir), and leave rewards.train_new_model.run.save_dir unset"),
    ("train_policy", {"task.query_length": 5, "rewards.train_new_model.task.query_length": 5},
     {"rewards.train_new_model.task.query_length": 5, "rewards.train_new_model.task.response_length": 3},
     "the policy's task and the new reward model's task differ in task.query_length, task.response_length; set both "
     "--task.X and --rewards.train_new_model.task.X"),
    # labels collected during PPO
    ("train_policy", {**ONLINE, "labels.online.initial_labels": 1, "rewards.train_new_model.batch_size": 1},
     {**ONLINE, "labels.online.initial_labels": 0}, "labels.online.initial_labels must be positive, got 0"),
    ("train_policy", {**ONLINE, "labels.online.total_labels": 16}, {**ONLINE, "labels.online.total_labels": 8},
     "labels.online.total_labels=8 must exceed labels.online.initial_labels=8: the difference is what is collected "
     "during PPO (equal counts are the offline case: --labels.online off)"),
    ("train_policy", ONLINE, {**ONLINE, "labels.online.episodes_between_rounds": 0},
     "labels.online.episodes_between_rounds must be positive, got 0"),
    ("train_policy", {**ONLINE, "labels.online.judge_temperature": 0.0},
     {**ONLINE, "labels.online.judge_temperature": -0.1}, "labels.online.judge_temperature must be >= 0, got -0.1"),
    ("train_policy", {**ONLINE, "labels.online.type": "best_of_4"}, {**ONLINE, "labels.online.type": "best_of_x"},
     "labels.online.type: unknown label type 'best_of_x'; accepted: best_of_N (N >= 2, e.g. best_of_4), "
     "scalar_rating, scalar_compare"),
    ("train_policy", {**ONLINE, "labels.online.judge": "human"}, {**ONLINE, "labels.online.judge": "nobody"},
     "labels.online.judge: unknown judge 'nobody'; known judges: letter_X: the fraction of the response's characters "
     "that are the letter X (e.g. letter_e); vowels: the fraction of the response's characters that are vowels; or "
     "`human` (people, in the labeling web app)"),
    ("train_policy", {**ONLINE, "labels.online.overlap": 1.0}, {**ONLINE, "labels.online.overlap": 1.01},
     "labels.online.overlap must be a fraction in [0, 1], got 1.01"),
    ("train_policy", {**ONLINE, "labels.online.overlap": 0.0}, {**ONLINE, "labels.online.overlap": -0.01},
     "labels.online.overlap must be a fraction in [0, 1], got -0.01"),
    ("train_policy", {**ONLINE, "labels.online.port": 65535}, {**ONLINE, "labels.online.port": 65536},
     "labels.online.port must be a TCP port 0..65535 (0: any free port), got 65536"),
    ("train_policy", {**ONLINE, "labels.online.port": 0}, {**ONLINE, "labels.online.port": -1},
     "labels.online.port must be a TCP port 0..65535 (0: any free port), got -1"),
    ("train_policy", ONLINE, {**ONLINE, "rewards.train_new_model": "off", "rewards.trained_model": "/runs/reward"},
     "labels.online retrains the reward model with the recipe of rewards.train_new_model (batch_size, lr, "
     "normalisation) and restarts it from the initial model each round: switch rewards.train_new_model on (and leave "
     "rewards.trained_model unset)"),
    ("train_policy", {**ONLINE, "labels.online.initial_labels": 16, "labels.online.total_labels": 24},
     {**ONLINE, "labels.online.initial_labels": 12},
     "labels.online.initial_labels=12 must be a multiple of rewards.train_new_model.batch_size=8 (each retraining is "
     "one pass over the labels in whole batches)"),
    ("train_policy", ONLINE, {**ONLINE, "labels.online.total_labels": 20},
     "labels.online.total_labels=20 must be a multiple of rewards.train_new_model.batch_size=8 (each retraining is "
     "one pass over the labels in whole batches)"),
    ("train_policy", ONLINE, {**ONLINE, "labels.online.episodes_between_rounds": 7},
     "labels.online.episodes_between_rounds=7 must be at least ppo.batch_size=8 (rounds come between PPO updates, at "
     "most one per update)"),
    ("train_policy", {**ONLINE, "labels.online.episodes_between_rounds": 15},
     {**ONLINE, "labels.online.episodes_between_rounds": 16},
     "labels.online.episodes_between_rounds=16 leaves no round within ppo.total_episodes=16; make it smaller"),
]


@pytest.mark.parametrize("command, accepted, refused, message", EDGES,
                         ids=[f"{e[0]}:{','.join(e[2])}={','.join(map(str, e[2].values()))}" for e in EDGES])
def test_each_rule_accepts_its_edge_and_refuses_just_past_it_with_its_message(command, accepted, refused, message):
    resolved(command, accepted)
    assert refusal(command, refused) == message


def test_a_prefix_reaches_the_online_rules_messages():
    """Validated as part of something larger, the online rules name their full place."""
    message = refusal("train_policy", {**ONLINE, "labels.online.episodes_between_rounds": 7}, prefix="trial.")
    assert message.startswith("trial.labels.online.episodes_between_rounds=7 must be at least ppo.batch_size=8")
    message = refusal("train_policy", {**ONLINE, "labels.online.total_labels": 8}, prefix="trial.")
    assert message.endswith("(equal counts are the offline case: --trial.labels.online off)")


def test_online_rules_of_the_group_alone():
    def online(**changes):
        values = dict(initial_labels=1, total_labels=2, episodes_between_rounds=1, judge="vowels")
        return OnlineLabelHParams(**{**values, **changes})

    online().validate("o.")
    online(episodes_between_rounds=1).validate("o.")
    with pytest.raises(HParamError, match=r"^o\.initial_labels must be positive, got 0$"):
        online(initial_labels=0, total_labels=2).validate("o.")


def test_the_online_rules_called_alone_name_labels_online():
    hparams = resolved("train_policy", ONLINE)
    hparams.labels.online.episodes_between_rounds = 7
    with pytest.raises(HParamError, match=r"^labels\.online\.episodes_between_rounds=7 must be at least"):
        check_online(hparams.labels.online, hparams.rewards, hparams.ppo)


def test_the_online_label_type_defaults_to_the_reward_models():
    hparams = resolved("train_policy", ONLINE)
    assert hparams.labels.online.label_type_name(hparams.rewards.train_new_model) == "best_of_4"
    hparams = resolved("train_policy", {**ONLINE, "labels.online.type": "scalar_rating"})
    assert hparams.labels.online.label_type_name(hparams.rewards.train_new_model) == "scalar_rating"


def test_place_reward_model_puts_it_in_the_runs_directory_only_when_there_is_one_to_place():
    hparams = resolved("train_policy", {})
    hparams.rewards.train_new_model.run.save_dir = None
    assert hparams.place_reward_model().rewards.train_new_model.run.save_dir == SAVE_DIR
    hparams.run.save_dir = "/moved"
    assert hparams.place_reward_model().rewards.train_new_model.run.save_dir == SAVE_DIR  # already placed: kept
    saved = resolved("train_policy", {"rewards.train_new_model": "off", "rewards.trained_model": "/runs/reward"})
    assert saved.place_reward_model().rewards.train_new_model is None


# ----- GPT-2's shape ---------------------------------------------------------------------------------------------

SHAPE = dict(n_vocab=27, n_ctx=8, n_embd=6, n_head=2, n_layer=1)


@pytest.mark.parametrize("name", ["n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"])
def test_every_size_must_be_positive(name):
    ModelHParams(**{**SHAPE, "n_embd": 1, "n_head": 1, name: 1}).validate("m: ")
    with pytest.raises(HParamError) as error:
        ModelHParams(**{**SHAPE, name: 0}).validate("m: ")
    assert str(error.value) == f"m: {name} must be positive, got 0"


def test_the_width_must_split_into_the_heads():
    ModelHParams(**{**SHAPE, "n_embd": 8, "n_head": 4}).validate("m: ")
    with pytest.raises(HParamError) as error:
        ModelHParams(**{**SHAPE, "n_embd": 6, "n_head": 4}).validate("m: ")
    assert str(error.value) == "m: n_embd=6 must be a multiple of m: n_head=4"


@pytest.mark.parametrize("name", ["embd_pdrop", "attn_pdrop", "resid_pdrop", "head_pdrop"])
def test_dropout_rates_are_in_zero_to_one_excluding_one(name):
    for accepted in (0.0, 0.999):
        ModelHParams(**{**SHAPE, name: accepted}).validate("m: ")
    for refused in (1.0, -0.1):
        with pytest.raises(HParamError) as error:
            ModelHParams(**{**SHAPE, name: refused}).validate("m: ")
        assert str(error.value) == f"m: {name} must be in [0, 1), got {refused}"


def test_an_hparams_json_is_read_with_unused_keys_tolerated():
    read = ModelHParams.from_json_dict({**SHAPE, "n_special": 0, "comment": "ours"}, where="f.json")
    assert read == ModelHParams(**SHAPE)


@pytest.mark.parametrize("name", ["n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"])
def test_an_hparams_json_missing_a_size_names_it(name):
    data = {key: value for key, value in SHAPE.items() if key != name}
    with pytest.raises(HParamError) as error:
        ModelHParams.from_json_dict(data, where="f.json")
    assert str(error.value) == (f"f.json: missing {name}; a GPT-2 hparams.json is a JSON object with the integers "
                                "n_vocab, n_ctx, n_embd, n_head, n_layer")


def test_an_hparams_json_that_is_not_an_object_or_holds_bad_values_names_the_file():
    for not_an_object in ([27, 8], "n_vocab n_ctx n_embd n_head n_layer"):
        with pytest.raises(HParamError) as error:
            ModelHParams.from_json_dict(not_an_object, where="f.json")
        assert str(error.value) == ("f.json: missing n_vocab, n_ctx, n_embd, n_head, n_layer; a GPT-2 hparams.json is "
                                    "a JSON object with the integers n_vocab, n_ctx, n_embd, n_head, n_layer")
    with pytest.raises(HParamError) as error:
        ModelHParams.from_json_dict({**SHAPE, "n_ctx": "abc"}, where="f.json")
    assert str(error.value) == "f.json: n_ctx: got 'abc', expected an integer"
    with pytest.raises(HParamError) as error:
        ModelHParams.from_json_dict({**SHAPE, "n_head": 0}, where="f.json")
    assert str(error.value) == "f.json: n_head must be positive, got 0"


# ----- how a PPO batch splits --------------------------------------------------------------------------------------

def ppo(**changes):
    return PpoHParams(**{**dict(total_episodes=100, batch_size=64, nminibatches=4, micro_batches=2), **changes})


def test_batch_sizes_split_the_batch_over_ranks_minibatches_and_micro_batches():
    assert batch_sizes(ppo(), 2) == BatchSizes(per_rank=32, minibatch=8, micro_batch=4, num_updates=2)
    assert batch_sizes(ppo(total_episodes=128, nminibatches=1, micro_batches=1), 1) == BatchSizes(64, 64, 64, 2)
    assert batch_sizes(ppo(total_episodes=129), 2).num_updates == 3  # the last update is whole


@pytest.mark.parametrize("changes, ranks, message", [
    ({}, 3, "ppo.batch_size=64 must be divisible by the number of MPI ranks (3)"),
    ({"nminibatches": 3}, 2, "the per-rank batch (ppo.batch_size / 2 ranks)=32 must be divisible by ppo.nminibatches "
                             "(3)"),
    ({"micro_batches": 3}, 2, "the per-rank minibatch (ppo.batch_size / ranks / ppo.nminibatches)=8 must be divisible "
                              "by ppo.micro_batches (3)"),
    ({"nminibatches": 8, "micro_batches": 1}, 2,
     "ppo.whiten_rewards whitens each per-rank minibatch, which holds only 4 episodes (ppo.batch_size=64 / 2 ranks / "
     "ppo.nminibatches=8); at least 8 are needed: raise ppo.batch_size, lower ppo.nminibatches or the number of "
     "ranks, or set --ppo.whiten_rewards false"),
])
def test_batch_sizes_that_do_not_fit_are_refused_naming_the_hyperparameters(changes, ranks, message):
    with pytest.raises(ValueError) as error:
        batch_sizes(ppo(**changes), ranks)
    assert str(error.value) == message


def test_whitening_needs_eight_episodes_per_minibatch_and_nothing_without_it():
    assert batch_sizes(ppo(nminibatches=4, micro_batches=1), 2).minibatch == 8  # exactly the least accepted
    assert batch_sizes(ppo(nminibatches=8, micro_batches=1, whiten_rewards=False), 2).minibatch == 4
