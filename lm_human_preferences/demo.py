"""The offline demo: the whole method on a CPU with no network (`./launch.py demo`, `make demo`).

A synthetic judge with a known preference plays the human labeler: it labels samples of the initial
policy, a reward model learns those labels, and PPO fine-tunes the policy against the reward model under
the KL penalty. Because the judge's preference is known, the report can say what no real run can: how
much the policy improved by the true objective, and how well the reward model agrees with it.

`demo_online` (`./launch.py demo --online`) collects the labels online instead, as the paper's summarization runs
did (online_labels.py): the judge labels samples of the current policy in rounds during PPO, and each round
retrains the reward model on all labels so far; the plot marks the rounds.
"""

import math
import os

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences import experiments, labeler, lm_tasks, plots, rewards, train_policy
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy, sampler
from lm_human_preferences.utils import devices, files


def mean_and_stderr(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def evaluate(hparams: train_policy.HParams, *, num_queries: int = 256, seed: int = 12345):
    """The judge's true score of the initial and the trained policy on the same held-out queries, the reward
    model's agreement with the judge on pairs of initial-policy samples and on pairs of trained-policy samples
    (where an offline reward model meets the distribution shift that online labels address), and the trained
    policy's KL."""
    task, save_dir = hparams.task, hparams.run.save_dir
    judge = labeler.get_judge(hparams.run.judge)
    initial_model = TrainedModel(task.policy.initial_model)
    trained_model = TrainedModel("policy", savedir=files.join(save_dir, "policy"), scope="policy")
    reward_source = (files.join(save_dir, "reward_model") if hparams.rewards.trained_model is None
                     else hparams.rewards.trained_model)
    reward_model_files = TrainedModel("reward_model", savedir=reward_source, scope="reward_model")
    encoder = initial_model.encoding.get_encoder()
    padding = initial_model.encoding.padding_token

    def cut(responses):  # what the reward model and the judge see: truncated as in training
        return lm_tasks.postprocess_responses(responses, task, padding)

    queries = next(lm_tasks.query_batches(task, encoder, num_queries, mode="test", seed=seed, rank=0, size=1))

    with tf.Graph().as_default():
        tf.set_random_seed(seed)
        embed = lm_tasks.query_formatter(task, encoder)
        initial = Policy(initial_model, scope="ref_policy", temperature=task.policy.temperature, embed_queries=embed)
        trained = Policy(trained_model, scope="policy", temperature=task.policy.temperature, embed_queries=embed)
        reward_model = rewards.RewardModel(reward_model_files, scope="reward_model")
        # Sampling is built after every model, so that the samplers' seeds (drawn in graph order) stay the same.
        _, queries_ph, _, initial_op = sampler(initial, task)
        trained_op = trained.respond_op(queries_ph, task.response_length)
        responses_ph = tf.placeholder(tf.int32, [None, task.response_length])
        ref_logprobs_op = initial.analyze_responses_op(queries_ph, responses_ph)["logprobs"]
        rewards_op = reward_model.get_rewards_op(queries_ph, responses_ph)
        with devices.new_session() as sess:
            sess.run(tf.global_variables_initializer())

            initial_a = sess.run(initial_op, {queries_ph: queries})["responses"]
            initial_b = sess.run(initial_op, {queries_ph: queries})["responses"]
            after = sess.run(trained_op, {queries_ph: queries})
            after_b = sess.run(trained_op, {queries_ph: queries})["responses"]
            ref_logprobs = sess.run(ref_logprobs_op, {queries_ph: queries, responses_ph: after["responses"]})
            reward_a, reward_b, reward_after, reward_after_b = (
                sess.run(rewards_op, {queries_ph: queries, responses_ph: cut(r)})
                for r in (initial_a, initial_b, after["responses"], after_b))

    judge_a, judge_b, judge_after, judge_after_b = (labeler.judge_scores(judge, encoder, queries, cut(r))
                                                    for r in (initial_a, initial_b, after["responses"], after_b))
    agreement, pairs = _agreement(reward_a, reward_b, judge_a, judge_b)
    trained_agreement, trained_pairs = _agreement(reward_after, reward_after_b, judge_after, judge_after_b)
    return {
        "judge": hparams.run.judge,
        "queries": num_queries,
        "initial_judge_score": mean_and_stderr(judge_a),
        "trained_judge_score": mean_and_stderr(judge_after),
        "reward_model_agreement": agreement,
        "agreement_pairs": pairs,
        "trained_reward_model_agreement": trained_agreement,
        "trained_agreement_pairs": trained_pairs,
        "kl_to_reference": mean_and_stderr((after["logprobs"] - ref_logprobs).sum(axis=1)),
        "trained_examples": [encoder.decode(r) for r in cut(after["responses"][:4])],
        "initial_examples": [encoder.decode(r) for r in cut(initial_a[:4])],
    }


def _agreement(reward_a, reward_b, judge_a, judge_b):
    """How often the reward model orders a pair of samples as the judge does, over the pairs the judge does not
    find equal; and how many those were (nan of 0 when the judge finds every pair equal)."""
    decided = judge_a != judge_b
    if not decided.any():
        return float("nan"), 0
    return float(np.mean(np.sign(reward_b - reward_a)[decided] == np.sign(judge_b - judge_a)[decided])), int(
        decided.sum())


def format_report(report) -> str:
    (m0, s0), (m1, s1) = report["initial_judge_score"], report["trained_judge_score"]
    kl, kl_se = report["kl_to_reference"]
    lines = [
        "=" * 80,
        f"Demo report: judge {report['judge']!r}, {report['queries']} held-out queries",
        f"  judge's true score, initial policy: {m0:.4f} ± {s0:.4f} (standard error)",
        f"  judge's true score, trained policy: {m1:.4f} ± {s1:.4f}   "
        f"(change {m1 - m0:+.4f} = {(m1 - m0) / math.hypot(s0, s1):+.1f} standard errors)",
        f"  reward model agrees with the judge on {100 * report['reward_model_agreement']:.1f}% of "
        f"{report['agreement_pairs']} pairs of initial-policy samples (chance: 50%)",
        f"  ... and on {100 * report['trained_reward_model_agreement']:.1f}% of {report['trained_agreement_pairs']} "
        f"pairs of trained-policy samples",
        f"  KL(trained || initial) per response: {kl:.3f} ± {kl_se:.3f} nats",
        "  initial samples: " + " | ".join(report["initial_examples"]),
        "  trained samples: " + " | ".join(report["trained_examples"]),
    ]
    return "\n".join(lines)


def free_name(save_dir: str, name: str) -> str:
    """NAME, or NAME-2, NAME-3, ... : the first that does not hold a run yet (a run is never overwritten, and a
    newcomer's second `make demo` should simply run again)."""
    candidate, number = name, 1
    while experiments.run_exists(os.path.join(os.path.expanduser(save_dir), candidate)):
        number += 1
        candidate = f"{name}-{number}"
    return candidate


def run_demo(name: str = "demo", save_dir: str = "/tmp/save/demo", overrides=None, experiment: str = "demo"):
    """Train with the `demo` experiment (or `demo_online`), then print the report and the path of the learning
    curves (drawn by the training run, plots.py: the judge's true score among them, and an online run's rounds).
    The run is saved to SAVE_DIR/NAME, or to the first free SAVE_DIR/NAME-N when that holds a run already."""
    free = free_name(save_dir, name)
    if free != name:
        print(f"{os.path.join(save_dir, name)} holds an earlier run (never overwritten); this demo saves to "
              f"{os.path.join(save_dir, free)}", flush=True)
    hparams = experiments.resolve_hparams("train_policy", experiment, free, save_dir=save_dir, overrides=overrides)
    train_policy.train(hparams)
    report = evaluate(hparams)
    print(format_report(report))
    path = os.path.join(hparams.run.save_dir, plots.FILENAME)
    if os.path.exists(path):  # else drawing failed, and training said why
        print(f"learning curves: {path}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(hparams.run.save_dir, 'tb')}")
    return report, path
