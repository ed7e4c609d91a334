"""PPO fine-tuning of a policy against a reward model: `./launch.py train_policy`.

One update step by step and every hyperparameter with its 2019 default: docs/algorithms.md; the saved run:
docs/saved_runs.md.
"""

import copy
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences import (labeler, lm_tasks, online_labels, plots, ppo, rewards, train_reward,
                                  trainer as run_utils)
from lm_human_preferences.language import trained_models
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy, sampler
from lm_human_preferences.utils import files, mpi, stats, train_ops
# The hyperparameters and the batch-size rule are declared in hparams.py, which needs no TensorFlow.
from lm_human_preferences.hparams import (MIN_WHITENED_MINIBATCH, BatchSizes, PpoHParams,  # noqa: F401
                                         PolicyLabelHParams as LabelHParams, RewardHParams, batch_sizes)
from lm_human_preferences.hparams import TrainPolicyHParams as HParams

class PPOTrainer:
    """The graph and session of a PPO run. `update()` is one PPO update, written out in order."""

    # What each update's randomness is drawn for (with the run seed, the rank and the update index).
    ROLLOUT, SHUFFLE = 1, 2

    def __init__(self, hparams: HParams, policy_model: TrainedModel, reward_model: TrainedModel, encoder,
                 seed: Optional[int] = None):
        """seed: the run's seed (run_utils.run_seed); by default run.seed, or one drawn when that is None."""
        self.hparams = hparams
        task, ppo_hp = hparams.task, hparams.ppo
        sizes = batch_sizes(ppo_hp, mpi.size())
        self.batch_per_rank, self.minibatch, self.micro_batch = sizes.per_rank, sizes.minibatch, sizes.micro_batch
        self.num_updates = sizes.num_updates
        self.micro_batches = [slice(start, start + self.micro_batch)  # of a minibatch
                              for start in range(0, self.minibatch, self.micro_batch)]
        self.kl_controller = (ppo.AdaptiveKLController(hparams.rewards.kl_coef, hparams.rewards.adaptive_kl.target,
                                                       hparams.rewards.adaptive_kl.horizon)
                              if hparams.rewards.adaptive_kl else ppo.FixedKLController(hparams.rewards.kl_coef))
        self.seed = run_utils.run_seed(hparams.run.seed) if seed is None else seed
        tf.set_random_seed(mpi.rank_seed(self.seed))  # initialisers; sampling and shuffles use the seeds below
        self.encoder = encoder
        # Hooks (queries, scored_responses) -> {tag: value} of this rank's episodes, averaged and logged with
        # each update's statistics: run.judge installs the demo judge's true score (`train` below).
        self.extra_stats: List[Callable[[np.ndarray, np.ndarray], Dict[str, float]]] = []

        compute_dtype = tf.bfloat16 if hparams.run.mixed_precision else tf.float32
        # The rollout: [b, query_length] queries in, [b, R] responses, logprobs and values out.
        self.policy, self.queries, self.rollout_seed, self.rollout_op = sampler(
            policy_model, task, encoder, scope="policy", seeded=True, compute_dtype=compute_dtype)
        self.ref_policy = Policy(policy_model, scope="ref_policy", temperature=task.policy.temperature,
                                 embed_queries=lm_tasks.query_formatter(task, encoder), compute_dtype=compute_dtype)
        self.reward_model = rewards.RewardModel(reward_model, scope="reward_model", compute_dtype=compute_dtype)
        R = task.response_length

        # Reference log-probs and scores: [b, query_length] / [b, R] in, per-episode arrays out.
        self.responses = tf.placeholder(tf.int32, [None, R], name="responses")
        self.ref_logprobs_op = self.ref_policy.analyze_responses_op(self.queries, self.responses)["logprobs"]
        # The reward model scores the responses post-processed (truncated) as the task says.
        self.scored_responses = tf.placeholder(tf.int32, [None, R], name="scored_responses")
        self.score_op = self.reward_model.get_rewards_op(self.queries, self.scored_responses)  # [b]

        # Advantages and returns of a whole minibatch, from its per-token rewards and the rollout's values.
        self.token_rewards = tf.placeholder(tf.float32, [None, R], name="token_rewards")
        self.values = tf.placeholder(tf.float32, [None, R], name="values")
        self.advantages_op = ppo.advantages_and_returns(self.token_rewards, self.values, ppo_hp)
        self.moments_op = ppo.return_and_value_moments(self.advantages_op[1], self.values)  # whole minibatch

        # The loss of one micro-batch: the rollout's log-probs and values, the minibatch's advantages and returns.
        self.logprobs = tf.placeholder(tf.float32, [None, R], name="logprobs")
        self.advantages = tf.placeholder(tf.float32, [None, R], name="advantages")
        self.returns = tf.placeholder(tf.float32, [None, R], name="returns")
        outputs = self.policy.analyze_responses_op(self.queries, self.responses)
        self.loss, self.train_stats = ppo.ppo_loss(
            logprobs=outputs["logprobs"], vpred=outputs["values"], entropies=outputs["entropies"],
            old_logprobs=self.logprobs, old_values=self.values, advantages=self.advantages,
            returns=self.returns, hparams=ppo_hp)
        self.lr = tf.placeholder(tf.float32, [], name="lr")
        self.optimizer = train_ops.Optimizer(self.loss, self.policy.get_params(), self.lr, epsilon=1e-5,
                                             micro_batches=ppo_hp.micro_batches)
        # As 2019: the last 20 checkpoints, named relative to their directory so that a moved run still loads.
        self.saver = tf.train.Saver(self.policy.get_params(), max_to_keep=20, save_relative_paths=True)
        # Online labels: the reward model's retraining, in this graph (built after PPO's optimizer, whose variable
        # names stay those of an offline run). `reward_model` is then the initial model, which round 0 trains.
        self.online = None if hparams.labels.online is None else online_labels.OnlineLabels(
            hparams, policy_model, encoder, self.reward_model, self.ref_policy, self.seed)
        # What --resume needs beyond the weights: Adam's state and the run's counters; online, also the reward
        # model, which each round retrains, and the rounds done.
        state_variables = self.policy.get_params() + self.optimizer.variables
        counters = {"update": tf.int64, "kl_coef": tf.float64, "seed": tf.int64}
        if self.online is not None:
            state_variables += self.reward_model.get_params()
            counters["online_rounds"] = tf.int64
        self.state = run_utils.TrainingState("ppo", state_variables, counters)
        self.sess = run_utils.new_session(hparams.run, tf.global_variables())
        if self.online is not None:
            self.online.training.sess = self.sess

    def update(self, queries, update_index):
        """One PPO update on this rank's `queries` [batch_per_rank, query_length]; returns its statistics (averaged
        over ranks) and details of this rank's episodes."""
        hp, task, sess = self.hparams.ppo, self.hparams.task, self.sess
        timer, rank = stats.Timer(), mpi.rank()
        # 1. The policy answers the queries, recording log-probs and values.
        with timer("rollout"):
            rollout = sess.run(self.rollout_op, {self.queries: queries, self.rollout_seed: run_utils.stateless_seed(
                self.seed, rank, self.ROLLOUT, update_index)})
        responses, logprobs, values = rollout["responses"], rollout["logprobs"], rollout["values"]  # [b, R] each
        # 2. The frozen reference policy's log-probs of the same responses.
        with timer("ref_logprobs"):
            ref_logprobs = sess.run(self.ref_logprobs_op, {self.queries: queries, self.responses: responses})
        # 3. Post-process (truncate) and score; responses that never end take the penalty.
        with timer("score"):
            scored = lm_tasks.postprocess_responses(responses, task, self.policy.padding_token)
            raw_scores = sess.run(self.score_op, {self.queries: queries, self.scored_responses: scored})
            scores = lm_tasks.apply_penalty(raw_scores, lm_tasks.responses_are_valid(responses, task), task)
        # 4. Per-token rewards: -kl_coef * (logp - ref_logp), the score added at the last token.
        kl_coef = self.kl_controller.value
        penalized = ppo.kl_penalized_rewards(logprobs, ref_logprobs, scores, kl_coef)  # [b, R] arrays
        kl = penalized["kl"].sum(axis=1)  # [b]: each response's KL
        # 5. Epochs of shuffled minibatches; each minibatch is one Adam step over its micro-batches.
        lr = hp.lr * (1.0 - update_index / self.num_updates)  # annealed linearly to 0 over the run
        episodes = dict(queries=queries, responses=responses, logprobs=logprobs, values=values,
                        token_rewards=penalized["rewards"])
        train_stats = []  # one dict per minibatch step
        shuffles = run_utils.numpy_rng(self.seed, rank, self.SHUFFLE, update_index)
        with timer("ppo_epochs"):
            for _ in range(hp.noptepochs):
                order = shuffles.permutation(self.batch_per_rank)
                for mb_start in range(0, self.batch_per_rank, self.minibatch):
                    mb = {k: v[order[mb_start:mb_start + self.minibatch]] for k, v in episodes.items()}
                    (advantages, returns), moments = sess.run([self.advantages_op, self.moments_op], {
                        self.token_rewards: mb["token_rewards"], self.values: mb["values"]})
                    micro_stats = self.optimizer.step(sess, [{
                        self.queries: mb["queries"][part], self.responses: mb["responses"][part],
                        self.logprobs: mb["logprobs"][part], self.values: mb["values"][part],
                        self.advantages: advantages[part], self.returns: returns[part]} for part in self.micro_batches],
                        self.train_stats, shared_feed={self.lr: lr})
                    # Every statistic of ppo_loss is a mean over tokens, so with equal micro-batches their mean is
                    # the minibatch's; the variances come from the whole minibatch.
                    train_stats.append({**{k: np.mean([s[k] for s in micro_stats]) for k in micro_stats[0]}, **moments})
        # 6. Statistics, averaged over ranks; then the KL controller sees the mean KL.
        with timer("stats"):
            update_stats = {
                "objective/kl": float(np.mean(kl)),
                "objective/kl_coef": kl_coef,
                "objective/entropy": float(np.mean(-logprobs.sum(axis=1))),
                "objective/score": float(np.mean(scores)),
                "objective/score_total": float(np.mean(scores - kl_coef * kl)),
                "objective/lr": lr,
                **{key: float(np.mean([s[key] for s in train_stats])) for key in train_stats[0]},
            }
            for extra_stats in self.extra_stats:
                update_stats.update(extra_stats(queries, scored))
            update_stats = stats.mean_over_ranks(update_stats)
            update_stats["ppo/val/var_explained"] = ppo.var_explained(update_stats)
            self.kl_controller.update(update_stats["objective/kl"], hp.batch_size)
        return update_stats, dict(responses=responses, scored_responses=scored, scores=scores, kl=kl,
                                  kl_coef=kl_coef, timings=timer.seconds)

    def save(self, save_dir, step, *, state: bool, policy: bool):
        """Checkpoint the policy as SAVE_DIR/policy/checkpoints/model.ckpt-STEP (with `policy`) and, with `state`,
        what resuming after `step` updates needs (rank 0; `save_dir` is the run's local directory)."""
        if mpi.is_root() and policy:
            model = self.policy
            trained_models.save_model(self.sess, self.saver, os.path.join(save_dir, "policy"), model.model_hparams,
                                      model.trained_model.encoding.name, step)
        if state:
            online = {} if self.online is None else {"online_rounds": self.online.rounds_done}
            self.state.save(self.sess, save_dir, step, update=step, kl_coef=self.kl_controller.value, seed=self.seed,
                            **online)

    def restore(self, save_dir) -> int:
        """Continue a saved run: weights, Adam's state, kl_coef and seed; returns the updates already done."""
        saved = self.state.restore(self.sess, save_dir)
        if saved is None:
            return 0
        self.kl_controller.value = saved["kl_coef"]
        self.seed = int(saved["seed"])
        if self.online is not None:
            self.online.seed, self.online.rounds_done = self.seed, int(saved["online_rounds"])
        return int(saved["update"])

    def current_policy_samples(self, queries, seed):
        """The policy's responses to `queries` [b, query_length], drawn with the stateless `seed` [2] and
        post-processed as they are scored (what labelers are shown): [b, response_length]."""
        responses = self.sess.run(self.rollout_op["responses"], {self.queries: queries, self.rollout_seed: seed})
        return lm_tasks.postprocess_responses(responses, self.hparams.task, self.policy.padding_token)


# What rank 0 prints once per update: the numbers a researcher watches.
CONSOLE_KEYS = ["objective/score", "objective/judge", "objective/kl", "objective/kl_coef", "objective/entropy",
                "elapsed/episodes_per_second"]


def log_samples(encoder, queries, details, count=3):
    """A few decoded episodes as 2019 printed them: the query, the post-processed (truncated) response that was
    scored, its score, its KL and their total, score − kl_coef·KL (rank 0)."""
    for i in range(min(count, len(queries))):
        total = details["scores"][i] - details["kl_coef"] * details["kl"][i]
        stats.log("=" * 80)
        stats.log(f"query:    {encoder.decode(queries[i])!r}")
        stats.log(f"response: {encoder.decode(details['scored_responses'][i])!r}")
        stats.log(f"  score = {details['scores'][i]:+.3f}\n  kl = {details['kl'][i]:+.3f}\n  total = {total:+.3f}")


def judge_objective(judge_name: str, encoder):
    """The hook `run.judge` installs (the demo's): a synthetic judge's true score of the scored responses,
    logged as objective/judge beside the reward model's objective/score."""
    judge = labeler.get_judge(judge_name)
    return lambda queries, responses: {
        "objective/judge": float(np.mean(labeler.judge_scores(judge, encoder, queries, responses)))}


def reward_model_path(hparams: HParams) -> str:
    """Where the reward model the run trains against is saved: rewards.trained_model, or SAVE_DIR/reward_model
    when the run trains it first."""
    if hparams.rewards.train_new_model is None:
        return hparams.rewards.trained_model
    return files.join(hparams.run.save_dir, "reward_model")


def reward_model_source(hparams: HParams, local_dir: str, resume: bool) -> TrainedModel:
    """The reward model to train against: a saved one, or one trained now into SAVE_DIR/reward_model (and
    loaded from the run's local directory `local_dir`). On --resume a reward model the run already finished
    training is used as it is."""
    if hparams.rewards.train_new_model is None:
        return TrainedModel("reward_model", savedir=hparams.rewards.trained_model, scope="reward_model")
    reward_hparams = hparams.rewards.train_new_model
    reward_hparams.run.save_dir = hparams.run.save_dir
    local = os.path.join(local_dir, "reward_model")
    if resume and train_reward.is_finished(local_dir):
        stats.log(f"resuming: the reward model in {files.join(hparams.run.save_dir, 'reward_model')} is trained")
    else:
        train_reward.train(reward_hparams, resume=resume, local_dir=local_dir)
    return TrainedModel("reward_model", savedir=local, scope="reward_model")


def saved_hparams(hparams: HParams) -> HParams:
    """What train_policy_hparams.json records: the run's hyperparameters with `rewards.trained_model` set to
    the reward model actually used, also when it is trained first, and that one's save_dir (as 2019 wrote it)."""
    recorded = copy.deepcopy(hparams)
    recorded.rewards.trained_model = reward_model_path(hparams)
    if recorded.rewards.train_new_model is not None:
        recorded.rewards.train_new_model.run.save_dir = hparams.run.save_dir
    return recorded


def train(hparams: HParams, resume: bool = False):
    """PPO against the reward model; saves SAVE_DIR/policy and TensorBoard logs in SAVE_DIR/tb/ppo.

    SAVE_DIR may be a gs:// URL: the run is written to a local copy (`files.staging_dir`) and uploaded after
    every checkpoint, the checkpoint state file last, so that a reader never sees half a checkpoint.
    resume: continue the run saved in SAVE_DIR from its last saved state (see trainer.py); a SIGTERM, SIGINT or
    SIGUSR1 saves that state at the next update boundary and raises trainer.RunInterrupted."""
    save_dir = hparams.run.save_dir
    local_dir = files.staging_dir(save_dir)
    task = hparams.task
    batch_sizes(hparams.ppo, mpi.size())  # refuse sizes that cannot work before a reward model is trained
    online = hparams.labels.online
    if online is not None and online.judge == online_labels.HUMAN:
        online_labels.check_human_judge_available()
    # learning_curves.png is drawn when the body ends, is interrupted or fails (plots.CurvesWhenDone)
    with run_utils.StopSignals() as stop, plots.CurvesWhenDone(local_dir, save_dir):
        if mpi.is_root():  # first, so that a run stopped while its reward model trains is known as a policy run
            os.makedirs(local_dir, exist_ok=True)
            saved_hparams(hparams).save_json(os.path.join(local_dir, "train_policy_hparams.json"))
        policy_model = TrainedModel(task.policy.initial_model)
        # Online, the rounds train the reward model from the initial model, round 0 before the first update.
        reward_model = policy_model if online is not None else reward_model_source(hparams, local_dir, resume)
        encoder = policy_model.encoding.get_encoder()
        with tf.Graph().as_default():
            trainer = PPOTrainer(hparams, policy_model, reward_model, encoder)
            if hparams.run.judge is not None:
                trainer.extra_stats.append(judge_objective(hparams.run.judge, encoder))
            start = trainer.restore(local_dir) if resume else 0
            if start:
                stats.log(f"resuming after update {start} of {trainer.num_updates}")
            if trainer.online is not None:
                trainer.online.load(local_dir, resume)
                stats.log(online_labels.describe_schedule(trainer.online.rounds))
            _run_updates(trainer, hparams, local_dir, encoder, start, stop)
            return trainer


def _run_updates(trainer: PPOTrainer, hparams: HParams, local_dir: str, encoder, start: int,
                 stop: run_utils.StopSignals):
    """Updates start .. num_updates - 1 with their logs and checkpoints; the end of the run."""
    save_dir, task = hparams.run.save_dir, hparams.task
    logger = stats.StatsLogger(os.path.join(local_dir, "tb", "ppo"), restart_at=start)
    query_batches = lm_tasks.query_batches(task, encoder, trainer.batch_per_rank, mode="train",
                                           seed=hparams.run.seed or 0)
    for _ in range(start):  # the queries the saved updates used
        next(query_batches)
    saving = False
    online = trainer.online
    reward_logger = None if online is None else stats.StatsLogger(  # the retrainings' steps follow one another
        os.path.join(local_dir, "tb", "reward_model"), restart_at=online.reward_steps_before(online.rounds_done))

    def save(step, *, state=True, policy=True):
        nonlocal saving
        saving = True
        trainer.save(local_dir, step, state=state, policy=policy)
        run_utils.publish(local_dir, save_dir)
        saving = False

    session_start = last_time = time.time()
    updates_done = start
    try:
        for update_index in stats.progress_bar(range(start, trainer.num_updates), "ppo",
                                               initial=start, total=trainer.num_updates):
            if stop.agreed():  # every rank stops after the same update, with its state saved
                save(updates_done)
                raise run_utils.RunInterrupted(run_utils.stop_message(
                    "train_policy", "update", updates_done, trainer.num_updates, save_dir))
            for due in ([] if online is None else online.due(update_index)):  # the paper's rounds (online_labels.py)
                round_stats = online.run_round(
                    due, sess=trainer.sess, sample=trainer.current_policy_samples, stop=stop, local_dir=local_dir,
                    save_dir=save_dir, reward_logger=reward_logger,
                    save_state=lambda: save(update_index, policy=False))
                logger.write(update_index, round_stats)
                last_time = time.time()  # the update's speed leaves out the round (a human one may take hours)
            queries = next(query_batches)
            update_stats, details = trainer.update(queries, update_index)
            updates_done = update_index + 1
            now = time.time()
            update_time, last_time = now - last_time, now
            update_stats.update({
                "elapsed/updates": updates_done,
                "elapsed/steps/serial": updates_done * task.response_length,  # tokens sampled one after another
                "elapsed/steps/total": updates_done * hparams.ppo.batch_size * task.response_length,
                "elapsed/episodes": updates_done * hparams.ppo.batch_size,
                # as in 2019, fps counts response tokens (all ranks) per second of the last update
                "elapsed/fps": hparams.ppo.batch_size * task.response_length / update_time,
                "elapsed/episodes_per_second": hparams.ppo.batch_size / update_time,
                "elapsed/time": now - session_start,
                **{f"time/{k}": v for k, v in details["timings"].items()},
            })
            logger.write(update_index, update_stats)  # TensorBoard steps start at 0, as in 2019
            eta = (now - session_start) / (updates_done - start) * (trainer.num_updates - updates_done)
            stats.log(stats.compact_line(f"{updates_done}/{trainer.num_updates}", update_stats, CONSOLE_KEYS,
                                         step_name="update") + f" | eta {stats.duration(eta)}")
            if update_index % hparams.run.log_interval == 0:
                log_samples(encoder, queries, details)
            if updates_done % hparams.run.save_interval == 0 and updates_done != trainer.num_updates:
                save(updates_done)
        mpi.check_identical_across_ranks(trainer.sess, trainer.policy.get_params(), "policy")
        if online is not None:
            mpi.check_identical_across_ranks(trainer.sess, trainer.reward_model.get_params(), "reward model")
    except run_utils.RunInterrupted:
        raise
    except BaseException:
        # As 2019 (a save in `finally`): a run that fails after training started keeps where it was. Not when
        # saving itself failed: a second try would most likely fail the same way and hide the error. The
        # resume state is not rewritten: the failed update may have changed some weights already.
        if not saving:
            stats.log(f"training stopped by an error after {updates_done} updates; saving a checkpoint")
            save(updates_done, state=False)
        raise
    finally:
        logger.close()
        if reward_logger is not None:
            reward_logger.close()
    if start == trainer.num_updates:
        stats.log(f"the run in {save_dir} had finished all {start} updates; nothing to resume")
        return
    save(trainer.num_updates)
    stats.log(f"saved the policy to {files.join(save_dir, 'policy')}")
