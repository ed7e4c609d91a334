"""The offline demo end to end (`./launch.py demo`): synthetic labels -> reward model -> PPO -> report and plot."""

import os

from lm_human_preferences import demo


def test_demo_improves_the_true_objective_and_the_reward_model_agrees_with_the_judge(tmp_path):
    overrides = {  # the demo experiment, smaller: about a minute on 2 cores
        "rewards.train_new_model.labels.num_train": 1024, "rewards.train_new_model.labels.num_valid": 256,
        "ppo.total_episodes": 64 * 40,
    }
    report, plot_path = demo.run_demo("small", str(tmp_path), overrides=overrides)
    (initial, initial_se), (trained, trained_se) = report["initial_judge_score"], report["trained_judge_score"]
    # the judge's true score rose by many standard errors (it is not just the reward model that is happier)
    assert trained - initial > 5 * (initial_se ** 2 + trained_se ** 2) ** 0.5, report
    # the reward model learned the judge's preference from its noisy choices: chance is 50% on pairs
    assert report["reward_model_agreement"] > 0.75 and report["agreement_pairs"] > 50, report
    kl, _ = report["kl_to_reference"]
    assert 0 < kl < 50, report
    assert os.path.getsize(plot_path) > 10_000 and plot_path.endswith(".png")
    text = demo.format_report(report)
    assert "standard errors" in text and "agrees with the judge" in text and "KL" in text


def test_a_second_demo_saves_beside_the_first_instead_of_overwriting_it(tmp_path):
    assert demo.free_name(str(tmp_path), "demo") == "demo"
    (tmp_path / "demo").mkdir()
    assert demo.free_name(str(tmp_path), "demo") == "demo"  # an empty directory holds no run
    (tmp_path / "demo" / "train_policy_hparams.json").write_text("{}")
    assert demo.free_name(str(tmp_path), "demo") == "demo-2"
    (tmp_path / "demo-2").mkdir()
    (tmp_path / "demo-2" / "labels.json").write_text("[]")
    assert demo.free_name(str(tmp_path), "demo") == "demo-3"
