"""Reward-model training from human preference labels: `./launch.py train_reward`.

The steps (normalise before, one pass over the labels, normalise after) and every hyperparameter with its 2019
default are in docs/algorithms.md; what is saved, in docs/saved_runs.md.
"""

import itertools
import math
import os
from typing import Optional

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences import label_types, labeler, lm_tasks, plots, rewards, trainer as run_utils
from lm_human_preferences.language import trained_models
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy, sampler
from lm_human_preferences.utils import files, mpi, stats, train_ops
# The hyperparameters are declared in hparams.py, which needs no TensorFlow (a --dry_run loads none).
from lm_human_preferences.hparams import LabelHParams, RunHParams  # noqa: F401
from lm_human_preferences.hparams import TrainRewardHParams as HParams


# ----- labels ---------------------------------------------------------------------------------------------------

def split_labels(labels, hparams: HParams):
    """As in 2019, the first `num_train` records of the file are the training set; the next `num_valid`
    are held out. The training order is one shuffle shared by all ranks (seeded by run.seed, not by rank)."""
    count = len(next(iter(labels.values())))
    num_train, num_valid = hparams.labels.num_train, hparams.labels.num_valid
    if count < num_train + num_valid:
        raise ValueError(f"{hparams.labels.source or 'the synthetic label set'} has {count} labels, but "
                         f"labels.num_train + labels.num_valid = {num_train} + {num_valid} = "
                         f"{num_train + num_valid} are needed")
    order = np.random.RandomState(hparams.run.seed or 0).permutation(num_train)
    return ({k: v[order] for k, v in labels.items()},
            {k: v[num_train:num_train + num_valid] for k, v in labels.items()})


# ----- training ---------------------------------------------------------------------------------------------------

class RewardTraining:
    """The graph and session of one reward-model training run; `train()` below drives it top to bottom."""

    # What sampling from the initial policy is for (with the run seed, the rank and a batch index).
    LABELS, NORMALIZE_BEFORE, DEBUG_BEFORE, NORMALIZE_AFTER, DEBUG_AFTER = 1, 2, 3, 4, 5

    def __init__(self, hparams: HParams, trained_model, encoder, label_type, seed: Optional[int] = None, *,
                 reward_model: Optional[rewards.RewardModel] = None, policy: Optional[Policy] = None,
                 new_session: bool = True):
        """seed: the run's seed (run_utils.run_seed); by default run.seed, or one drawn when that is None.

        Built alone (`train` below) it makes its reward model, initial policy and session. A PPO run that
        retrains its reward model online (online_labels.py) builds it into its own graph instead: `reward_model`
        and `policy` (the frozen reference policy, which is the initial policy) are the PPO graph's, and with
        `new_session=False` the caller sets `.sess` once its graph is complete."""
        self.hparams = hparams
        self.label_type = label_type
        self.padding_token = trained_model.encoding.padding_token
        task = hparams.task
        self.rollout_per_rank = mpi.exact_div(hparams.rollout_batch_size, mpi.size(), "rollout_batch_size")
        self.batch_per_rank = mpi.exact_div(hparams.batch_size, mpi.size(), "batch_size")
        self.seed = run_utils.run_seed(hparams.run.seed) if seed is None else seed
        tf.set_random_seed(mpi.rank_seed(self.seed))  # initialisers (rank 0's weights are shared)
        compute_dtype = tf.bfloat16 if hparams.run.mixed_precision else tf.float32
        self.reward_model = reward_model or rewards.RewardModel(trained_model, scope="reward_model",
                                                                compute_dtype=compute_dtype)
        # The initial policy: what the labelers were shown, and what the normalisation is measured on.
        self.policy, self.queries, self.sample_seed, self.sampled = sampler(
            policy or trained_model, task, encoder, scope="ref_policy", seeded=True, compute_dtype=compute_dtype)
        self.responses = tf.placeholder(tf.int32, [None, task.response_length], name="responses")
        self.rewards = self.reward_model.get_rewards_op(self.queries, self.responses)  # [b]

        self.label_placeholders = {
            name: tf.placeholder(dtype, [None] + list(shape), name=f"label_{name}")
            for name, (dtype, shape) in label_type.label_schemas(task.query_length, task.response_length).items()}
        self.loss, self.metrics = label_type.loss(self.reward_model.get_rewards_op, self.label_placeholders)
        self.lr = tf.placeholder(tf.float32, [], name="lr")
        self.optimizer = train_ops.Optimizer(self.loss, self.reward_model.get_params(), self.lr,
                                             epsilon=1e-5)
        # Relative paths in the checkpoint state file, so that a moved or uploaded run still loads (as 2019).
        self.saver = tf.train.Saver(self.reward_model.get_params(), max_to_keep=1, save_relative_paths=True)
        # What --resume needs: the weights, Adam's state, the steps done and whether normalize_before is done.
        self.state = run_utils.TrainingState("reward_model", self.reward_model.get_params() + self.optimizer.variables,
                                             {"step": tf.int64, "normalized_before": tf.int64, "seed": tf.int64})
        self.sess = run_utils.new_session(hparams.run, tf.global_variables()) if new_session else None

    # -- sampling from the initial policy
    def sample(self, queries, purpose: int, index: int):
        """Responses of the initial policy, raw and post-processed (what the reward model scores), drawn with
        the stateless seed of (run seed, rank, purpose, index): the same in a resumed run."""
        seed = run_utils.stateless_seed(self.seed, mpi.rank(), purpose, index)
        raw = self.sess.run(self.sampled["responses"], {self.queries: queries, self.sample_seed: seed})
        return raw, lm_tasks.postprocess_responses(raw, self.hparams.task, self.padding_token)

    def rewards_on_policy_samples(self, query_batches, count, purpose: int):
        """This rank's rewards of the initial policy's raw samples (no truncation, no penalty, as 2019 scored
        them for the normalisation): ceil(count / rollout_batch_size) whole rollout batches over all ranks, so
        that count is rounded up to a multiple of rollout_batch_size (512 samples where 256 are asked for with
        a batch of 512, as in the 2019 book tasks)."""
        rewards_seen = []
        for index in range(math.ceil(count / self.hparams.rollout_batch_size)):
            queries = next(query_batches)
            raw, _ = self.sample(queries, purpose, index)
            rewards_seen.append(self.sess.run(self.rewards, {self.queries: queries, self.responses: raw}))
        return np.concatenate(rewards_seen)

    def normalization_batches(self) -> int:
        """Query batches one normalisation takes, its debug_normalize check included."""
        return sum(math.ceil(count / self.hparams.rollout_batch_size)
                   for count in (self.hparams.normalize_samples, self.hparams.debug_normalize))

    def normalize(self, query_batches, target_mean, target_std, when, purposes):
        """Set gain and bias so that rewards of fresh initial-policy samples have the target mean and std. As in
        2019 the scale is reset first (gain 1, bias 0), so the result does not depend on where it started; then
        `debug_normalize` fresh samples report what was reached."""
        self.reward_model.reset_reward_scale(self.sess)
        samples = self.rewards_on_policy_samples(query_batches, self.hparams.normalize_samples, purposes[0])
        mean, std = stats.mean_and_std_over_ranks(samples)
        self.reward_model.set_reward_norm(self.sess, measured_mean=mean, measured_std=std,
                                          target_mean=target_mean, target_std=target_std)
        stats.log(f"rewards {when}: mean {mean:.4f} ± std {std:.4f} on {len(samples) * mpi.size()} policy samples; "
                  f"normalised to mean {target_mean:.4f}, std {target_std:.4f}")
        if self.hparams.debug_normalize:
            fresh = self.rewards_on_policy_samples(query_batches, self.hparams.debug_normalize, purposes[1])
            mean, std = stats.mean_and_std_over_ranks(fresh)
            stats.log(f"after normalising {when}: mean {mean:.4f} ± std {std:.4f} on {len(fresh) * mpi.size()} "
                      f"fresh policy samples")

    # -- optimisation
    def feed(self, labels, ids):
        return {self.label_placeholders[name]: values[ids] for name, values in labels.items()
                if name in self.label_placeholders}

    def train_step(self, labels, ids, lr):
        """One Adam step on the labels `ids`; returns their loss and metrics."""
        (results,) = self.optimizer.step(self.sess, [self.feed(labels, ids)], {"loss": self.loss, **self.metrics},
                                         shared_feed={self.lr: lr})
        return results

    def evaluate(self, labels):
        """Mean loss and metrics over a held-out set, sharded across ranks (collective)."""
        count = len(next(iter(labels.values())))
        mine = np.arange(count)[mpi.rank()::mpi.size()]
        sums = {}
        for start in range(0, len(mine), self.batch_per_rank):
            ids = mine[start:start + self.batch_per_rank]
            for name, value in self.sess.run({"loss": self.loss, **self.metrics}, self.feed(labels, ids)).items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(ids)
        return stats.mean_over_examples(sums, len(mine))

    def save_state(self, local_dir, step, normalized_before):
        """What resuming after `step` training steps needs (rank 0; the run's local directory)."""
        self.state.save(self.sess, local_dir, step, step=step, normalized_before=int(normalized_before),
                        seed=self.seed)

    def save(self, save_dir):
        """SAVE_DIR/reward_model/checkpoints/model.ckpt, without a step suffix as 2019 (rank 0; local save_dir)."""
        if mpi.is_root():
            model = self.reward_model
            trained_models.save_model(self.sess, self.saver, os.path.join(save_dir, "reward_model"),
                                      model.model_hparams, model.trained_model.encoding.name, step=None)


def read_labels(path: str, hparams: HParams, label_type, encoding):
    """The label file at `path`, validated, as (training labels, held-out labels)."""
    task = hparams.task
    return split_labels(label_types.load_labels(path, label_type, query_length=task.query_length,
                                                response_length=task.response_length, encoding=encoding), hparams)


def write_synthetic_labels(path: str, training: "RewardTraining", label_type, hparams: HParams, encoder):
    """The synthetic judge's labels (demo) in the released format at `path`: rank 0 samples the initial policy on
    the task's queries and has the judge choose; every rank waits for the file."""
    count = hparams.labels.num_train + hparams.labels.num_valid
    if mpi.is_root():
        query_batches = lm_tasks.query_batches(hparams.task, encoder, training.rollout_per_rank, mode="train",
                                               seed=(hparams.run.seed or 0) + 1, rank=0, size=1)
        batches = itertools.count()  # the index of each sampling batch, in its stateless seed

        def sample(queries):
            return training.sample(queries, training.LABELS, next(batches))[1]

        records = labeler.label_samples(sample, query_batches, label_type, labeler.get_judge(hparams.labels.judge),
                                        encoder, count, hparams.labels.judge_temperature,
                                        np.random.RandomState(hparams.run.seed or 0))
        labeler.write_label_file(path, records)
        stats.log(f"wrote {count} {label_type.name} labels from judge {hparams.labels.judge!r} to {path}")
    mpi.barrier()


# TensorBoard tags as 2019 wrote them (train_reward/minibatch/...), and our learning rate and held-out metrics.
TRAIN_TAG, VALID_TAG = "train_reward/minibatch/", "train_reward/valid/"


def is_finished(local_dir: str) -> bool:
    """Whether the run in `local_dir` holds a trained reward model (written once, at the very end)."""
    return os.path.exists(os.path.join(local_dir, "reward_model", "checkpoints", "model.ckpt.index"))


def train(hparams: HParams, resume: bool = False, local_dir: Optional[str] = None):
    """Train a reward model from preference labels and save it to SAVE_DIR/reward_model, with TensorBoard logs
    in SAVE_DIR/tb/reward_model. SAVE_DIR may be a gs:// URL (written locally, uploaded at the end).
    resume: continue the run saved in SAVE_DIR from its last saved state; a SIGTERM, SIGINT or SIGUSR1 saves
    that state at the next step and raises trainer.RunInterrupted. local_dir: the run's local directory when the
    caller (train_policy) has it already; by default `files.staging_dir(SAVE_DIR)`."""
    save_dir = hparams.run.save_dir
    local_dir = files.staging_dir(save_dir) if local_dir is None else local_dir
    if resume and is_finished(local_dir):
        stats.log(f"the reward model in {files.join(save_dir, 'reward_model')} is trained; nothing to resume")
        return None
    task = hparams.task
    label_type = label_types.get(hparams.labels.type)
    num_steps = hparams.labels.num_train // hparams.batch_size  # exact: checked by HParams.check
    trained_model = TrainedModel(task.policy.initial_model)
    encoding = trained_model.encoding
    encoder = encoding.get_encoder()
    # The labels come from a file: labels.source, or the synthetic judge's SAVE_DIR/labels.json. A file that exists
    # is read (and checked) before anything is written or built; the judge's are made first by the initial policy
    # (a resumed run reads those it made).
    judged = hparams.labels.source is None
    labels_file = os.path.join(local_dir, "labels.json") if judged else hparams.labels.source
    make_labels = judged and not (resume and os.path.exists(labels_file))
    if not make_labels:
        train_labels, valid_labels = read_labels(labels_file, hparams, label_type, encoding)

    # learning_curves.png is drawn when the body ends, is interrupted or fails (plots.CurvesWhenDone)
    with run_utils.StopSignals() as stop, plots.CurvesWhenDone(local_dir, save_dir), tf.Graph().as_default():
        training = RewardTraining(hparams, trained_model, encoder, label_type)
        saved = training.state.restore(training.sess, local_dir) if resume else None
        start, normalized_before = 0, False
        if saved is not None:
            training.seed, start, normalized_before = int(saved["seed"]), int(saved["step"]), bool(
                saved["normalized_before"])
            stats.log(f"resuming the reward model after step {start} of {num_steps}")
        if mpi.is_root():
            os.makedirs(local_dir, exist_ok=True)
            hparams.save_json(os.path.join(local_dir, "train_reward_hparams.json"))
        if make_labels:
            write_synthetic_labels(labels_file, training, label_type, hparams, encoder)
            train_labels, valid_labels = read_labels(labels_file, hparams, label_type, encoding)
        query_batches = lm_tasks.query_batches(task, encoder, training.rollout_per_rank, mode="train",
                                               seed=hparams.run.seed or 0)

        def stop_if_asked(step):
            if stop.agreed():
                training.save_state(local_dir, step, normalized_before)
                run_utils.publish(local_dir, save_dir)
                raise run_utils.RunInterrupted(run_utils.stop_message(
                    "train_reward", "step", step, num_steps, save_dir))

        if hparams.normalize_before:
            if normalized_before:
                for _ in range(training.normalization_batches()):  # the queries the saved run used
                    next(query_batches)
            else:
                target_mean, target_std = label_type.target_mean_std(train_labels)
                training.normalize(query_batches, target_mean, target_std, "before training",
                                   (training.NORMALIZE_BEFORE, training.DEBUG_BEFORE))
        normalized_before = True

        with stats.StatsLogger(os.path.join(local_dir, "tb", "reward_model"), restart_at=start) as logger:
            for step in stats.progress_bar(range(start, num_steps), "reward model", initial=start, total=num_steps):
                stop_if_asked(step)
                _train_step(training, hparams, logger, train_labels, valid_labels, step, num_steps)
                if (step + 1) % hparams.run.save_interval == 0 and step + 1 < num_steps:
                    training.save_state(local_dir, step + 1, normalized_before)
                    run_utils.publish(local_dir, save_dir)  # a preempted machine's local copy may be gone
            stop_if_asked(num_steps)
        if hparams.normalize_after:
            training.normalize(query_batches, 0.0, 1.0, "after training",
                               (training.NORMALIZE_AFTER, training.DEBUG_AFTER))
        mpi.check_identical_across_ranks(training.sess, training.reward_model.get_params(), "reward_model")
        training.save(local_dir)
        run_utils.publish(local_dir, save_dir)
        stats.log(f"saved the reward model to {files.join(save_dir, 'reward_model')}")
        return training


def _train_step(training: RewardTraining, hparams: HParams, logger, train_labels, valid_labels, step, num_steps,
                log_step: Optional[int] = None):
    """One Adam step on the global batch `step` (this rank's share), with its logs at TensorBoard step `log_step`
    (default `step`; an online run's retrainings continue one another's steps)."""
    lr = hparams.lr * (1 - step / num_steps)  # linear decay to 0 over the pass
    global_ids = np.arange(step * hparams.batch_size, (step + 1) * hparams.batch_size)
    rank_ids = global_ids[mpi.rank()::mpi.size()]  # this rank's share of the global batch
    record = {TRAIN_TAG + k: v for k, v in training.train_step(train_labels, rank_ids, lr).items()}
    record["train_reward/lr"] = lr
    report = step == num_steps - 1 or (step + 1) % hparams.run.log_interval == 0
    if hparams.labels.num_valid and report:
        record.update({VALID_TAG + k: v for k, v in training.evaluate(valid_labels).items()})
    record = logger.record(step if log_step is None else log_step, record)  # averaged over ranks (collective)
    if report:
        stats.log(stats.compact_line(f"{step + 1}/{num_steps}", record, sorted(record),
                                     step_name="reward model step"))
