"""Labels collected online: comparisons of the CURRENT policy's samples, labelled while PPO trains, and the reward
model retrained on all labels so far (paper section 2.3). The paper did this for its summarization runs, where
the policy drifts far from the initial model and a reward model trained on initial-policy samples alone meets a
large distribution shift; every 2019 experiment here is offline, so `labels.online` is off by default.

The schedule is the paper's. Before PPO episode n, l(n) = N0 + (N - N0) (1 - (1 - n / N_pi)^2) labels are wanted,
where N_pi is `ppo.total_episodes`, N0 `labels.online.initial_labels` and N `labels.online.total_labels`: front
loaded, as the policy moves fastest early. The paper trained the reward model before the first episode and then
19 more times at evenly spaced episodes (every 100,000 of 2M). Here a round comes every
`labels.online.episodes_between_rounds` episodes (at the first update boundary at or after that many), and each
round first collects what l(n) asks for by then, rounded up to whole reward-model batches; so l(n) holds at every
retraining, as it did when the paper's PPO paused whenever its labelers fell behind l(n). Labels l(n) would ask for
after the last retraining are not collected (they could change nothing).

One round (`OnlineLabels.run_round`), on every rank:

1. Collect: rank 0 takes the next queries of the task's query stream, samples the label type's responses from the
   current policy (post-processed as PPO scores them, at the task's temperature) and has them labelled by the
   judge: a synthetic one (labeler.py), or `human`: PPO pauses while `label_app.collect_labels` serves the round
   in a browser. The round's records go to SAVE_DIR/online_labels.json (the released format plus a `round`
   field, written atomically) before anything else happens, so that no label is ever lost; then every rank
   receives all labels by broadcast.
2. Measure how stale the reward model had become: its loss and accuracy on the new labels, before retraining
   (`online/accuracy_before_retrain`).
3. Retrain as the paper did: "each time we retrain we reinitialize r to a random linear layer on top of rho and do
   a single epoch through the labels collected so far". The reward model restarts from the initial language
   model rho (the frozen reference policy's trunk) with a fresh random head; then `normalize_before`, one epoch
   over all labels in a fresh shuffle, `normalize_after`, with `rewards.train_new_model`'s recipe (batch size,
   learning rate, normalisation) and train_reward's machinery. Restarting rather than continuing also keeps one
   round's idiosyncrasies from compounding into the next.
4. PPO continues against the new reward model, which is also saved to SAVE_DIR/reward_model.

Resuming: the PPO run's state (resume/ppo) holds the reward model and the number of rounds done, saved at the start
of each round (so that a human round serves the same items after a restart, the web app resuming from its
journal) and at its end. A run stopped in the middle of a round keeps every label already collected; the resumed
run collects only what is missing and retrains from the start of that retraining.
"""

import copy
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences import label_types, labeler, lm_tasks, train_reward, trainer as run_utils
from lm_human_preferences.utils import files, mpi, stats
# The group `labels.online` and its rules are declared in hparams.py, which needs no TensorFlow.
from lm_human_preferences.hparams import OnlineLabelHParams, check_online  # noqa: F401

HUMAN = "human"  # the judge that is people, in the labeling web app (label_app.py)
LABELS_FILE = "online_labels.json"  # SAVE_DIR/online_labels.json: every label collected so far
ROUNDS_DIR = "online"  # SAVE_DIR/online/round_NN.json (and the web app's journal beside it): human rounds


# ----- the schedule ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Round:
    index: int  # 0: before PPO starts
    update: int  # the PPO update it comes before (updates done so far)
    episodes: int  # PPO episodes done by then: n
    labels: int  # labels held after the round: l(n) rounded up to whole reward-model batches


def labels_wanted(episodes: int, online: OnlineLabelHParams, total_episodes: int) -> float:
    """The paper's l(n): labels wanted before PPO episode n = `episodes`."""
    progress = min(episodes / total_episodes, 1.0)
    return online.initial_labels + (online.total_labels - online.initial_labels) * (1 - (1 - progress) ** 2)


def schedule(online: OnlineLabelHParams, ppo_hparams, reward_batch_size: int) -> List[Round]:
    """Every round of a run: round 0 before PPO, then one every `episodes_between_rounds` episodes (at the first
    update boundary at or after it) while updates remain."""
    num_updates = math.ceil(ppo_hparams.total_episodes / ppo_hparams.batch_size)
    rounds = []
    for index in itertools.count():
        update = -(-index * online.episodes_between_rounds // ppo_hparams.batch_size)  # ceil, in integers
        if index and update >= num_updates:
            return rounds
        episodes = update * ppo_hparams.batch_size
        batches = math.ceil(labels_wanted(episodes, online, ppo_hparams.total_episodes) / reward_batch_size - 1e-9)
        rounds.append(Round(index, update, episodes, min(online.total_labels, batches * reward_batch_size)))


def describe_schedule(rounds: List[Round]) -> str:
    later = ", ".join(f"{r.labels} at update {r.update}" for r in rounds[1:])
    plural = "s" if len(rounds) != 2 else ""
    return (f"online labels: {rounds[0].labels} before PPO starts, then {len(rounds) - 1} round{plural} (labels held "
            f"after each: {later})")


# ----- the label file -------------------------------------------------------------------------------------------

def load_records(local_dir: str) -> List[dict]:
    """The labels collected so far by the run in `local_dir` ([] when none)."""
    path = os.path.join(local_dir, LABELS_FILE)
    if not os.path.exists(path):
        return []
    return files.read_json(path, collective=False)


# ----- the rounds -----------------------------------------------------------------------------------------------

class OnlineLabels:
    """The online rounds of a PPO run. Built into the PPO trainer's graph (it shares the reward model and the frozen
    reference policy, which is the initial model rho); `run_round` is called by train_policy between updates."""

    # What randomness is drawn for (with the run seed and the round).
    LABEL_SAMPLES, JUDGE_NOISE, SHUFFLE = 101, 102, 103
    NORMALIZE = 200  # + 4 * round + 0..3: the reward model's normalisation samples (train_reward's purposes)
    QUERY_SEED_OFFSET = 2  # the label queries' stream (matters for the endless `test` dataset only)

    def __init__(self, hparams, initial_model, encoder, reward_model, ref_policy, seed: int):
        """hparams: the train_policy HParams; initial_model: the TrainedModel of task.policy.initial_model;
        reward_model, ref_policy: the PPO graph's; seed: the run's seed."""
        self.hparams = hparams
        self.online = hparams.labels.online
        self.encoder = encoder
        self.encoding = initial_model.encoding
        self.reward_hparams = copy.deepcopy(hparams.rewards.train_new_model)
        self.reward_hparams.labels.type = self.online.label_type_name(self.reward_hparams)
        self.reward_hparams.labels.num_valid = 0
        self.label_type = label_types.get(self.reward_hparams.labels.type)
        self.judge = None if self.online.judge == HUMAN else labeler.get_judge(self.online.judge)
        self.rounds = schedule(self.online, hparams.ppo, self.reward_hparams.batch_size)
        self.num_updates = math.ceil(hparams.ppo.total_episodes / hparams.ppo.batch_size)
        self.rounds_done = 0
        self.records: List[dict] = []  # rank 0: every label so far, as in LABELS_FILE (see `load`)
        self.training = train_reward.RewardTraining(self.reward_hparams, initial_model, encoder, self.label_type,
                                                    seed=seed, reward_model=reward_model, policy=ref_policy,
                                                    new_session=False)
        self._restart_seed = tf.placeholder(tf.int64, [2], name="reward_model_restart_seed")
        self._restart = tf.group(restart_from_initial_model(reward_model, ref_policy, self._restart_seed),
                                 tf.variables_initializer(self.training.optimizer.variables))

    @property
    def seed(self) -> int:
        return self.training.seed

    @seed.setter
    def seed(self, value: int):
        self.training.seed = value

    def load(self, local_dir: str, resume: bool):
        """Rank 0: the labels a resumed run had collected (SAVE_DIR/online_labels.json); a new run starts with none."""
        if mpi.is_root():
            self.records = load_records(local_dir) if resume else []

    def reward_steps_before(self, round_index: int) -> int:
        """Reward-model steps of the retrainings before round `round_index` (their TensorBoard steps follow)."""
        return sum(r.labels // self.reward_hparams.batch_size for r in self.rounds[:round_index])

    def due(self, update_index: int) -> List[Round]:
        """The rounds not done yet that come before update `update_index`."""
        return [r for r in self.rounds[self.rounds_done:] if r.update <= update_index]

    # -- one round
    def run_round(self, round: Round, *, sess, sample: Callable, save_state: Callable, stop, local_dir: str,
                  save_dir: str, reward_logger) -> Dict[str, float]:
        """Collect, measure, retrain (module docstring); returns the round's statistics (the same on every rank).
        sample(queries [b, query_length], seed [2]) -> the current policy's post-processed responses [b, R];
        save_state(): save the PPO run's resume state now (collective)."""
        self.training.sess = sess
        save_state()  # the policy that samples this round, and the labels the round starts from
        held = len(self.records) if mpi.is_root() else 0
        status = None
        if mpi.is_root() and held < round.labels:
            status = self._collect(round, round.labels - held, sample, local_dir, save_dir)
        if self.judge is None:
            mpi.barrier_asleep()  # people may label for hours: the other ranks wait without spinning
        status, columns = mpi.broadcast((status, self._columns() if mpi.is_root() and status is None else None))
        if status is not None:  # people stopped labelling (Ctrl-C, or a stop signal): resume continues the round
            stats.log(status)
            raise run_utils.RunInterrupted(run_utils.stop_message(
                "train_policy", "update", round.update, self.num_updates, save_dir))
        rounds_of_labels = columns.pop("round")
        count = len(rounds_of_labels)
        result = {"online/round": round.index, "online/labels": count,
                  "online/new_labels": int(np.sum(rounds_of_labels == round.index))}
        new = {name: values[rounds_of_labels == round.index] for name, values in columns.items()}
        if round.index > 0 and result["online/new_labels"]:
            before = self.training.evaluate(new)  # collective
            result.update({f"online/{name}_before_retrain": value for name, value in before.items()
                           if name != "error"})  # error is the loss again (2019's tag)
        self._retrain(round, columns, stop, save_dir, reward_logger)
        self.rounds_done = round.index + 1
        self.training.save(local_dir)  # SAVE_DIR/reward_model: the reward model PPO now trains against
        save_state()
        stats.log(stats.compact_line(f"{round.index} (update {round.update})", result, sorted(result),
                                     step_name="online round") + "; reward model retrained and saved")
        return result

    def _collect(self, round: Round, count: int, sample: Callable, local_dir: str, save_dir: str) -> Optional[str]:
        """Rank 0: `count` new labels of current-policy samples, appended to LABELS_FILE. Returns None, or why
        the labels could not all be had (people stopped)."""
        task = self.hparams.task
        queries = self._label_queries(len(self.records), count)  # [count, query_length]
        batch = max(1, self.hparams.ppo.batch_size // mpi.size())  # what one rank samples at once in PPO
        num_samples = len(self.label_type.sample_fields())
        samples = []  # num_samples arrays [count, R]
        for k in range(num_samples):
            samples.append(np.concatenate([
                sample(queries[start:start + batch], run_utils.stateless_seed(
                    self.seed, self.LABEL_SAMPLES, round.index, k, start // batch))
                for start in range(0, count, batch)]))
        who = "people" if self.judge is None else f"judge {self.online.judge!r}"
        stats.log(f"online round {round.index} (update {round.update}): {count} {self.label_type.name} labels of "
                  f"current-policy samples wanted from {who}")
        if self.judge is not None:
            rng = np.random.RandomState(int(run_utils.stateless_seed(self.seed, self.JUDGE_NOISE, round.index)[0]))
            records = labeler.make_records(self.label_type, queries, samples, self.judge, self.encoder,
                                           self.online.judge_temperature, rng)
        else:
            records = self._ask_people(round, queries, samples, local_dir)
            if len(records) < count:
                return (f"labelling of online round {round.index} stopped with {len(records)} of {count} labels; "
                        f"they are kept in {files.join(save_dir, ROUNDS_DIR)}, and --resume serves the rest")
        label_types.validate_records(records, self.label_type, query_length=task.query_length,
                                     response_length=task.response_length, encoding=self.encoding,
                                     source=f"the labels of online round {round.index}")
        self.records.extend({**record, "round": round.index} for record in records)
        labeler.write_label_file(os.path.join(local_dir, LABELS_FILE), self.records)
        run_utils.publish(local_dir, save_dir)
        return None

    def _label_queries(self, skip: int, count: int) -> np.ndarray:
        """Queries `skip` .. `skip + count` of the label queries' stream (rank 0 alone): each label has a query of its
        own, also across rounds and resumes. [count, query_length]"""
        stream = lm_tasks.query_batches(self.hparams.task, self.encoder, 1, mode="train", rank=0, size=1,
                                        seed=(self.hparams.run.seed or 0) + self.QUERY_SEED_OFFSET)
        return np.concatenate(list(itertools.islice(stream, skip, skip + count)))

    def _ask_people(self, round: Round, queries, samples, local_dir: str) -> List[dict]:
        """The round's items served in the labeling web app until all are labelled (PPO waits). A stop signal or
        Ctrl-C ends the serving with the labels so far (the app's journal keeps them): fewer records come back."""
        from lm_human_preferences import label_app  # Flask and the page are needed only here
        online = self.online
        fields = self.label_type.sample_fields()
        items = [{"query": queries[i].tolist(), **{name: samples[k][i].tolist() for k, name in enumerate(fields)}}
                 for i in range(len(queries))]
        instructions = None if online.instructions is None else files.read_text(online.instructions)
        output = os.path.join(local_dir, ROUNDS_DIR, f"round_{round.index:02d}.json")
        os.makedirs(os.path.dirname(output), exist_ok=True)
        made_by = {"what": "samples of the current PPO policy", "run": self.hparams.run.save_dir,
                   "round": round.index, "update": round.update}
        try:
            # a stop signal raises KeyboardInterrupt at once while people label: the app exports the labels so far,
            # and the run then stops with its state saved, as after any signal
            with label_app.interrupt_on(*run_utils.STOP_SIGNALS):
                return label_app.collect_labels(items, self.label_type.name, output, host=online.host,
                                                port=online.port, token=online.token, overlap=online.overlap,
                                                instructions=instructions, encoder=self.encoder, announce=stats.log,
                                                made_by=made_by)
        except KeyboardInterrupt:
            return load_round_file(output)

    def _columns(self) -> Dict[str, np.ndarray]:
        """Rank 0: every label so far as arrays ({field: [n, ...]}, and `round` [n]) for all ranks."""
        task = self.hparams.task
        columns = label_types.validate_records(self.records, self.label_type, query_length=task.query_length,
                                               response_length=task.response_length, encoding=self.encoding,
                                               source=LABELS_FILE)
        columns["round"] = np.array([record["round"] for record in self.records], np.int64)
        return columns

    def _retrain(self, round: Round, labels: Dict[str, np.ndarray], stop, save_dir: str, reward_logger):
        """Restart the reward model from the initial model and train it one epoch over `labels` (module docstring)."""
        training, hp = self.training, self.reward_hparams
        count = len(next(iter(labels.values())))
        order = run_utils.numpy_rng(self.seed, self.SHUFFLE, round.index).permutation(count)  # same on all ranks
        labels = {name: values[order] for name, values in labels.items()}
        training.sess.run(self._restart, {self._restart_seed: run_utils.stateless_seed(self.seed, round.index)})
        query_batches = lm_tasks.query_batches(self.hparams.task, self.encoder, training.rollout_per_rank,
                                               mode="train", seed=self.hparams.run.seed or 0)
        purposes = [self.NORMALIZE + 4 * round.index + k for k in range(4)]
        if hp.normalize_before:
            target_mean, target_std = self.label_type.target_mean_std(labels)
            training.normalize(query_batches, target_mean, target_std, "before training", purposes[:2])
        num_steps = count // hp.batch_size
        first_step = self.reward_steps_before(round.index)
        for step in range(num_steps):
            if stop.agreed():
                stats.log(f"stopped while retraining the reward model in online round {round.index}; its labels are "
                          f"kept in {files.join(save_dir, LABELS_FILE)}, and --resume retrains it from the start")
                raise run_utils.RunInterrupted(run_utils.stop_message(
                    "train_policy", "update", round.update, self.num_updates, save_dir))
            train_reward._train_step(training, hp, reward_logger, labels, None, step, num_steps,
                                     log_step=first_step + step)
        if hp.normalize_after:
            training.normalize(query_batches, 0.0, 1.0, "after training", purposes[2:])


def restart_from_initial_model(reward_model, initial_policy, seed) -> tf.Operation:
    """Put the reward model where the paper restarted it each round: the trunk of the initial model rho, read from
    `initial_policy` (the frozen reference policy, which holds it), a fresh random reward head (normal weights with
    std 1 / sqrt(n_embd + 1) and bias 0, as a new head is built; drawn from the stateless `seed` [2]) and the
    identity normalisation (gain 1, bias 0)."""
    trunk = {variable.op.name[len(initial_policy.scope) + 1:]: variable for variable in initial_policy.get_params()}
    n_embd = reward_model.model_hparams.n_embd
    assignments = []
    for variable in reward_model.get_params():
        name = variable.op.name[len(reward_model.scope) + 1:]  # e.g. model/h0/attn/c_attn/w, reward_norm/gain
        shape = variable.shape.as_list()
        if name == "model/heads/reward/w":
            value = tf.random.stateless_normal(shape, seed, stddev=1 / np.sqrt(n_embd + 1))
        elif name == "reward_norm/gain":
            value = tf.ones(shape)
        elif name in ("model/heads/reward/b", "reward_norm/bias"):
            value = tf.zeros(shape)
        elif name in trunk:
            value = trunk[name].read_value()
        else:
            raise ValueError(f"cannot restart {variable.op.name} from the initial model: no {name} under "
                             f"{initial_policy.scope}/")
        assignments.append(variable.assign(value))
    return tf.group(*assignments, name="restart_reward_model")


def load_round_file(path: str) -> List[dict]:
    """What the web app exported of a round it was serving when stopped ([] when nothing)."""
    return json.loads(files.read_text(path)) if os.path.exists(path) else []


def check_human_judge_available():
    """Refuse a human-judged online run before any work when the labeling web app cannot be imported here."""
    try:
        from lm_human_preferences import label_app  # noqa: F401
    except ImportError as error:
        raise ValueError(f"labels.online.judge human serves the rounds in the labeling web app, which cannot be "
                         f"imported here ({error}); install the package with its dependencies "
                         f"(pip install -e .)") from None

