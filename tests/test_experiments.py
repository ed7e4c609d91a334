"""The experiment registry: every entry resolves and validates, its values are the paper's, and sweeps expand
into trials (cross products, descriptors, overrides that collapse a sweep)."""

import json

import pytest

from lm_human_preferences import experiments, launcher
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.utils import mpi

LABELS = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels"
PAPER = ["sentiment", "descriptiveness", "cnndm", "tldr"]
ALL = PAPER + ["test", "demo"]
SWEEPS = {"train_reward": {"test_seeds": 2}, "train_policy": {"descriptiveness_seeds": 3, "test_seeds": 2}}

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
REWARD_TRAINING = {  # the paper's reward experiments
    "sentiment": dict(batch_size=32, lr=5e-5, rollout_batch_size=512, num_train=4_992, labels="sentiment/offline_5k"),
    "descriptiveness": dict(batch_size=32, lr=5e-5, rollout_batch_size=512, num_train=4_992,
                            labels="descriptiveness/offline_5k"),
    "cnndm": dict(batch_size=16, lr=2.5e-5, rollout_batch_size=128, num_train=46_000, labels="cnndm/online_45k"),
    "tldr": dict(batch_size=16, lr=2.5e-5, rollout_batch_size=128, num_train=46_000, labels="tldr/online_45k"),
}
PPO = {  # the paper's policy experiments: (ppo.lr, total_episodes, ppo.batch_size, kl_coef, adaptive target, whiten)
    "sentiment": (1e-5, 1_000_000, 512, 0.15, 6.0, True),
    "descriptiveness": (1e-5, 1_000_000, 512, 0.15, 6.0, True),
    "cnndm": (2e-6, 1_000_000, 32, 0.01, None, False),
    "tldr": (2e-6, 1_000_000, 32, 0.03, None, False),
}
PPO_DEFAULTS = dict(nminibatches=1, noptepochs=4, vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0,
                    lam=0.95, micro_batches=1)  # no paper experiment changes them


def resolve(command, experiment):
    return experiments.resolve_hparams(command, experiment, "x")


def test_every_experiment_resolves_and_validates_for_both_commands():
    assert sorted(experiments.REWARD_EXPERIMENTS) == sorted(ALL + list(SWEEPS["train_reward"]))
    assert sorted(experiments.POLICY_EXPERIMENTS) == sorted(ALL + ["demo_online"] + list(SWEEPS["train_policy"]))
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
        experiments.lookup("train_policy", "descriptivness")
    message = str(info.value)
    assert "unknown train_policy experiment 'descriptivness'" in message
    assert "did you mean descriptiveness?" in message
    assert ("known experiments: cnndm, demo, demo_online, descriptiveness, descriptiveness_seeds, sentiment, test, "
            "test_seeds, tldr") in message
    with pytest.raises(ValueError, match="unknown command 'train'; known commands: train_reward, train_policy"):
        experiments.lookup("train", "test")


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
            for _, hparams in experiments.resolve_trials(command, experiment, "x"):
                assert type(hparams).from_nested_dict(json.loads(hparams.to_json())) == hparams


# ----- sweeps -----------------------------------------------------------------------------------------------------

def test_registered_sweeps_expand_to_their_trials():
    for command, sweeps in SWEEPS.items():
        for experiment, count in sweeps.items():
            trials = experiments.resolve_trials(command, experiment, "x")
            assert len(trials) == count, (command, experiment)
            assert len({hparams.run.save_dir for _, hparams in trials}) == count


def test_descriptiveness_seeds_is_descriptiveness_over_seeds_1_2_3(tmp_path):
    trials = experiments.resolve_trials("train_policy", "descriptiveness_seeds", "seeds", save_dir=str(tmp_path))
    assert [trial.descriptor for trial, _ in trials] == ["seed1", "seed2", "seed3"]
    assert [trial.swept for trial, _ in trials] == [{"run.seed": 1}, {"run.seed": 2}, {"run.seed": 3}]
    for seed, (trial, hparams) in zip([1, 2, 3], trials):
        assert hparams.run.save_dir == str(tmp_path / "seeds" / f"seed{seed}")
        single = experiments.resolve_hparams("train_policy", "descriptiveness", "seeds", save_dir=str(tmp_path),
                                             overrides={"run.seed": seed})
        single.run.save_dir = single.rewards.train_new_model.run.save_dir = hparams.run.save_dir
        assert hparams == single  # the paper's experiment, only the seed (and directory) differ
    assert trials[2][1].rewards.train_new_model.run.seed == 1  # the nested reward experiment keeps its seed


def test_overrides_apply_to_every_trial_and_overriding_a_swept_name_collapses_the_sweep(tmp_path):
    trials = experiments.resolve_trials("train_policy", "descriptiveness_seeds", "x", overrides={"ppo.lr": "3e-6"})
    assert [hparams.ppo.lr for _, hparams in trials] == [3e-6] * 3
    [(trial, hparams)] = experiments.resolve_trials("train_policy", "descriptiveness_seeds", "x",
                                                    save_dir=str(tmp_path), overrides={"run.seed": "7"})
    assert (trial.descriptor, hparams.run.seed, hparams.run.save_dir) == ("", 7, str(tmp_path / "x"))
    # a single trial, so the single-trial API takes it
    assert experiments.resolve_hparams("train_policy", "descriptiveness_seeds", "x", overrides={"run.seed": "7"}) == \
        experiments.resolve_hparams("train_policy", "descriptiveness", "x", overrides={"run.seed": "7"})
    # an explicit run.save_dir is the base of the trials' directories
    trials = experiments.resolve_trials("train_reward", "test_seeds", "x", overrides={"run.save_dir": "/exact"})
    assert [hparams.run.save_dir for _, hparams in trials] == ["/exact/seed1", "/exact/seed2"]


def test_a_sweep_is_not_a_single_trial():
    with pytest.raises(ValueError, match=r"train_policy experiment 'descriptiveness_seeds' is a sweep of 3 trials "
                                         r"\(over run.seed\); expected a single trial: override run.seed to pick one"):
        experiments.resolve_hparams("train_policy", "descriptiveness_seeds", "x")
    with pytest.raises(ValueError, match=r"is a sweep of 2 trials \(over run.seed\)"):
        experiments.resolve_hparams("train_reward", "test_seeds", "x")


def test_sweeps_cross_in_the_order_first_bound_and_compose_like_bindings():
    group = experiments.combine(experiments.bind("lr", 1.0), experiments.sweep("run.seed", [1, 2]),
                                experiments.sweep("lr", [1e-3, 2.5e-5]))
    trials = experiments.trials(group)
    # lr was bound first, so its part comes first; floats as Python writes them
    assert [t.descriptor for t in trials] == ["lr0.001-seed1", "lr0.001-seed2", "lr2.5e-05-seed1", "lr2.5e-05-seed2"]
    assert [(t.bindings["lr"], t.bindings["run.seed"]) for t in trials] == [
        (1e-3, 1), (1e-3, 2), (2.5e-5, 1), (2.5e-5, 2)]
    assert list(trials[0].bindings) == ["lr", "run.seed"]
    # a later single value replaces a sweep; `fixed` (the command-line overrides) leaves the name out
    assert [t.descriptor for t in experiments.trials(experiments.combine(group, experiments.bind("lr", 5.0)))] == \
        ["seed1", "seed2"]
    [only] = experiments.trials(group, fixed={"lr", "run.seed"})
    assert (only.descriptor, only.swept, only.bindings) == ("", {}, {})
    # nest keeps the key; a key can be chosen
    nested = experiments.trials(experiments.nest("rewards.train_new_model", experiments.sweep("run.seed", [3])))
    assert (nested[0].descriptor, nested[0].swept) == ("seed3", {"rewards.train_new_model.run.seed": 3})
    keyed = experiments.trials(experiments.sweep("rewards.kl_coef", [0.1], key="kl"))
    assert keyed[0].descriptor == "kl0.1"


@pytest.mark.parametrize("value, text", [
    (True, "true"), (None, "none"), (-3, "-3"), (1e-05, "1e-05"), ("a b/c:d", "a_b_c_d"), ("124M", "124M")])
def test_descriptors_are_safe_directory_names(value, text):
    assert experiments.describe(value) == text


def test_sweep_errors():
    with pytest.raises(ValueError, match=r"sweep of run.seed: no values given; expected at least one"):
        experiments.sweep("run.seed", [])
    with pytest.raises(ValueError, match=r"sweep of task.query_dataset: values \['a/b', 'a_b'\] give repeated "
                                         r"descriptors \['query_dataseta_b', 'query_dataseta_b'\]"):
        experiments.sweep("task.query_dataset", ["a/b", "a_b"])
    with pytest.raises(ValueError, match=r"sweep of run.seed: key 'my seed' must hold only letters, digits and"):
        experiments.sweep("run.seed", [1], key="my seed")
    # two sweeps whose joined parts coincide
    clash = experiments.combine(experiments.sweep("a.k", ["1", "1-k2"]), experiments.sweep("b.k", ["2-k3", "3"]))
    with pytest.raises(ValueError, match=r"give trials with the same descriptor \['k1-k2-k3'\]; give the sweeps "
                                         r"distinct keys"):
        experiments.trials(clash)
