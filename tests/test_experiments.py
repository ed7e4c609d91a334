"""The experiment registry (SPEC section 9): every entry resolves and validates, and its values are the paper's."""

import json

import pytest

from lm_human_preferences import experiments, launcher
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.utils import mpi

LABELS = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels"
PAPER = ["sentiment", "descriptiveness", "cnndm", "tldr"]
ALL = PAPER + ["test", "demo"]

BOOK_TASK = {
    "query_length": 64, "query_dataset": "books", "response_length": 24, "start_text": ".", "end_text": ".",
    "truncate_token": 13, "truncate_after": 16, "query_prefix": "", "query_suffix": "",
    "penalty_reward_value": -1, "policy": {"temperature": 0.7, "initial_model": "124M"}, "query_source": None,
}
SUMMARY_TASK = {
    "query_length": 500, "response_length": 75, "start_text": None, "truncate_after": 55, "truncate_token": 198,
    "query_suffix": "\n\nTL;DR:", "penalty_reward_value": -1, "query_source": None,
}
TASKS = {
    "sentiment": BOOK_TASK,
    "descriptiveness": BOOK_TASK,
    "cnndm": {**SUMMARY_TASK, "query_dataset": "cnndm", "query_prefix": "Article:\n\n", "end_text": "\n",
              "policy": {"temperature": 0.5, "initial_model": "124M"}},
    "tldr": {**SUMMARY_TASK, "query_dataset": "tldr", "query_prefix": "", "end_text": None,
             "policy": {"temperature": 0.7, "initial_model": "124M"}},
}
REWARD_TRAINING = {  # SPEC 9, reward experiments
    "sentiment": dict(batch_size=32, lr=5e-5, rollout_batch_size=512, num_train=4_992, labels="sentiment/offline_5k"),
    "descriptiveness": dict(batch_size=32, lr=5e-5, rollout_batch_size=512, num_train=4_992,
                            labels="descriptiveness/offline_5k"),
    "cnndm": dict(batch_size=16, lr=2.5e-5, rollout_batch_size=128, num_train=46_000, labels="cnndm/online_45k"),
    "tldr": dict(batch_size=16, lr=2.5e-5, rollout_batch_size=128, num_train=46_000, labels="tldr/online_45k"),
}
PPO = {  # SPEC 9, policy experiments: (ppo.lr, total_episodes, ppo.batch_size, kl_coef, adaptive target, whiten)
    "sentiment": (1e-5, 1_000_000, 512, 0.15, 6.0, True),
    "descriptiveness": (1e-5, 1_000_000, 512, 0.15, 6.0, True),
    "cnndm": (2e-6, 1_000_000, 32, 0.01, None, False),
    "tldr": (2e-6, 1_000_000, 32, 0.03, None, False),
}
PPO_DEFAULTS = dict(nminibatches=1, noptepochs=4, vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0,
                    lam=0.95, micro_batches=1)  # SPEC 8; no paper experiment changes them


def resolve(command, experiment):
    return launcher.resolve_hparams(command, experiment, "x")


def test_every_experiment_resolves_and_validates_for_both_commands():
    assert sorted(experiments.REWARD_EXPERIMENTS) == sorted(ALL)
    assert sorted(experiments.POLICY_EXPERIMENTS) == sorted(ALL)
    for experiment in ALL:
        for command in launcher.COMMANDS:
            hparams = resolve(command, experiment)
            assert hparams.run.save_dir == f"/tmp/save/{command}/x"
            assert hparams.run.seed == 1, (command, experiment)


@pytest.mark.parametrize("experiment", PAPER)
def test_reward_experiments_have_the_papers_values(experiment):
    hparams = resolve("train_reward", experiment)
    expected = REWARD_TRAINING[experiment]
    assert hparams.task.to_nested_dict() == TASKS[experiment]
    assert (hparams.batch_size, hparams.lr, hparams.rollout_batch_size) == (
        expected["batch_size"], expected["lr"], expected["rollout_batch_size"])
    assert hparams.labels.type == "best_of_4"
    assert hparams.labels.num_train == expected["num_train"]
    assert hparams.labels.source == f"{LABELS}/{expected['labels']}.json"
    assert (hparams.labels.judge, hparams.labels.num_valid) == (None, 0)  # real labels, no synthetic judge
    assert (hparams.normalize_before, hparams.normalize_after, hparams.normalize_samples) == (True, True, 256)
    assert hparams.debug_normalize == 0


@pytest.mark.parametrize("experiment", PAPER)
def test_policy_experiments_have_the_papers_values(experiment):
    hparams = resolve("train_policy", experiment)
    lr, total_episodes, batch_size, kl_coef, target, whiten = PPO[experiment]
    ppo = hparams.ppo
    assert (ppo.lr, ppo.total_episodes, ppo.batch_size, ppo.whiten_rewards) == (lr, total_episodes, batch_size, whiten)
    assert {name: getattr(ppo, name) for name in PPO_DEFAULTS} == PPO_DEFAULTS
    assert hparams.rewards.kl_coef == kl_coef
    if target is None:
        assert hparams.rewards.adaptive_kl is None
    else:
        assert (hparams.rewards.adaptive_kl.target, hparams.rewards.adaptive_kl.horizon) == (target, 10_000)
    assert hparams.task.to_nested_dict() == TASKS[experiment]
    assert hparams.run.seed == 1


@pytest.mark.parametrize("experiment", ALL)
def test_a_policy_experiment_trains_its_reward_experiment_first(experiment):
    """rewards.train_new_model is the reward experiment of the same name, exactly (its save_dir is set by
    train_policy to the policy's run directory)."""
    policy = resolve("train_policy", experiment)
    assert policy.rewards.trained_model is None
    nested = policy.rewards.train_new_model.to_nested_dict()
    alone = resolve("train_reward", experiment).to_nested_dict()
    nested["run"].pop("save_dir"), alone["run"].pop("save_dir")
    assert nested == alone
    assert policy.task == policy.rewards.train_new_model.task


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_paper_batches_split_evenly_over_the_2019_rank_counts(ranks):
    """The 2019 runs used 8 GPUs; every per-rank batch of the paper's experiments must divide exactly."""
    for experiment in PAPER:
        reward = resolve("train_reward", experiment)
        for name in ("batch_size", "rollout_batch_size", "normalize_samples"):
            mpi.exact_div(getattr(reward, name), ranks, name)
        policy = resolve("train_policy", experiment)
        per_rank = mpi.exact_div(policy.ppo.batch_size, ranks, "ppo.batch_size")
        mpi.exact_div(per_rank, policy.ppo.nminibatches, "ppo.batch_size / ranks")


@pytest.mark.parametrize("experiment", ALL)
def test_queries_and_responses_fit_the_models_context(experiment):
    """query + prefix + suffix + response tokens <= n_ctx (characters bound the BPE token count from above)."""
    task = resolve("train_policy", experiment).task
    n_ctx = {"124M": 1024}.get(task.policy.initial_model)
    if n_ctx is None:
        n_ctx = TrainedModel(task.policy.initial_model).hparams().n_ctx
    assert task.query_length + len(task.query_prefix) + len(task.query_suffix) + task.response_length <= n_ctx


def test_unknown_experiment_lists_the_known_ones_and_suggests_the_closest():
    with pytest.raises(ValueError) as info:
        experiments.get("train_policy", "descriptivness")
    message = str(info.value)
    assert "unknown train_policy experiment 'descriptivness'" in message
    assert "did you mean descriptiveness?" in message
    assert "known experiments: cnndm, demo, descriptiveness, sentiment, test, tldr" in message
    with pytest.raises(ValueError, match="unknown command 'train'; known commands: train_reward, train_policy"):
        experiments.get("train", "test")


def test_bindings_compose_later_ones_winning():
    group = experiments.combine(experiments.bind("a", 1), experiments.nest("n", experiments.bind("b", 2)),
                                experiments.bind("a", 3))
    assert group == [("a", 1), ("n.b", 2), ("a", 3)]
    assert experiments.resolve(group) == {"a": 3, "n.b": 2}


def test_every_binding_names_a_declared_hyperparameter():
    """A typo in the registry (`ppo.whiten` for `ppo.whiten_rewards`) fails here, not at someone's launch."""
    for command, registry in experiments.EXPERIMENTS.items():
        known = set(launcher.command_module(command).HParams.dotted_names())
        for experiment, bindings in registry.items():
            unknown = [name for name, _ in bindings if name not in known]
            assert not unknown, (command, experiment, unknown)
            # and the dotted values survive a JSON round trip unchanged (what the MPI ranks receive)
            hparams = resolve(command, experiment)
            assert type(hparams).from_nested_dict(json.loads(hparams.to_json())) == hparams
