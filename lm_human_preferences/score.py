"""Rewards of texts from a saved reward model: `./launch.py score` and, from Python, `RewardScorer` / `score_texts`.

REWARD_MODEL_DIR (the layout is in docs/saved_runs.md) is one of

* a train_reward run directory: its `reward_model/`, with the task of its `train_reward_hparams.json`;
* a train_policy run directory: the reward model its PPO trained against, i.e. its own `reward_model/` when it
  trained one (rewards.train_new_model, labels.online), otherwise the `rewards.trained_model` recorded in its
  `train_policy_hparams.json`; with the run's task (that of `train_reward_hparams.json` when the run holds one);
* a run's `reward_model/` directory: with the task of the run directory it sits in.

The reward model is loaded as the trainers load it (`rewards.RewardModel` on
`TrainedModel("reward_model", savedir=..., scope="reward_model")`), and a reward is the score PPO would give the
response: the query and response texts become tokens as text_inputs.py says, the task's truncate_token rule
cuts the response, the reward model (normalisation included) scores the bare query followed by the response, and
a response that never ends (no truncate_token at index >= truncate_after) gets the task's penalty_reward_value
instead (the book tasks end a response at a "." from token 16 on, the summary tasks at a newline from token 55
on). Tasks without a truncate_token (test, demo) have no cut and no penalty.
"""

import json
import os
import sys
from typing import NamedTuple, Optional, Sequence

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences import lm_tasks, rewards, text_inputs
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.utils import devices, files

# The reward head's weight, as a reward model is saved (docs/saved_runs.md): what tells a reward model from a policy.
REWARD_HEAD = "reward_model/model/heads/reward/w"
EXPECTED = ("expected a train_reward or train_policy run directory (holding train_reward_hparams.json or "
            "train_policy_hparams.json) or a run's reward_model/ directory")


class RewardModelRun(NamedTuple):
    model_dir: str  # the saved reward model: hparams.json, encoding, checkpoints/
    task: lm_tasks.TaskHParams  # the run's task: lengths, truncation, penalty


def find_reward_model(path: str) -> RewardModelRun:
    """The reward model and task settings of REWARD_MODEL_DIR `path` (module docstring); a ValueError saying what
    `path` holds when it is none of those."""
    path = os.fspath(path)
    where = f"REWARD_MODEL_DIR {path}"
    if not files.is_remote(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ValueError(f"{where}: {EXPECTED}; {text_inputs.describe_directory(path)}")
    run = text_inputs.saved_run(path)
    if run is not None:
        own = files.join(path, "reward_model")
        if run.command == "train_reward" or files.exists(files.join(own, "hparams.json")):
            model_dir = own
        else:
            model_dir = run.hparams.rewards.trained_model
            if not model_dir:
                raise ValueError(f"{where}: a train_policy run without a reward model (neither reward_model/ nor "
                                 f"rewards.trained_model in its train_policy_hparams.json)")
    elif files.exists(files.join(path, "hparams.json")):  # a saved model: its run's settings are beside it
        model_dir = path
        parent = files.join(path, "..") if files.is_remote(path) else \
            os.path.dirname(os.path.abspath(os.path.expanduser(path)))
        run = text_inputs.saved_run(parent)
        if run is None:
            raise ValueError(f"{where}: a saved model, but its run's hyperparameters ({parent}/"
                             f"train_reward_hparams.json or train_policy_hparams.json) are not beside it, so the "
                             f"task's lengths and truncation are unknown; pass the run directory")
    else:
        found = "" if files.is_remote(path) else f"; {text_inputs.describe_directory(path)}"
        raise ValueError(f"{where}: not a reward-model run: {EXPECTED}{found}")
    if not files.exists(files.join(model_dir, "hparams.json")):
        raise ValueError(f"{where}: the run's reward model {model_dir} is not saved (no hparams.json): has its "
                         f"training finished?")
    return RewardModelRun(model_dir, run.task)


class Scores(NamedTuple):
    rewards: np.ndarray  # [n] float32: what PPO would score (the penalty where a response never ends)
    model_rewards: np.ndarray  # [n] float32: the reward model's output on the (truncated) responses
    ended: np.ndarray  # [n] bool: the response ends (always true for a task without truncate_token)


class RewardScorer:
    """A saved reward model, open for scoring texts (module docstring). Construction reads and checks the run;
    the graph and session are built at the first score, then kept until `close()` (or the end of a `with`).

        with RewardScorer("/tmp/save/train_reward/myrun") as scorer:
            rewards = scorer.score(["query text", ...], ["response text", ...])   # float32 [n]
    """

    def __init__(self, reward_model_dir: str, *, truncate: bool = False, batch_size: int = 64,
                 truncate_hint: str = "truncate=True"):
        """truncate: cut texts longer than the task's lengths instead of refusing them. batch_size: texts per
        session call."""
        self.reward_model_dir = os.fspath(reward_model_dir)
        self.model_dir, self.task = find_reward_model(self.reward_model_dir)
        self.trained_model = TrainedModel("reward_model", savedir=self.model_dir, scope="reward_model")
        checkpoint = self.trained_model.checkpoint()
        names = [name for name, _ in tf.train.list_variables(checkpoint)]
        if REWARD_HEAD not in names:
            scopes = sorted({name.split("/")[0] for name in names if "/" in name})
            raise ValueError(f"REWARD_MODEL_DIR {self.reward_model_dir}: {self.model_dir} holds no reward model (its "
                             f"checkpoint has no {REWARD_HEAD}; its scopes: {', '.join(scopes) or 'none'}); "
                             f"{EXPECTED}")
        self.encoding = self.trained_model.encoding
        self.encoder = self.encoding.get_encoder()
        self.texts = text_inputs.TaskText(self.task, self.encoder, truncate=truncate, truncate_hint=truncate_hint)
        self.batch_size = batch_size
        self.sess = None

    def encode(self, query: str, response: str, where: str) -> tuple:
        """(query [query_length], response [response_length] before the truncate_token rule); errors name
        `where` and the field."""
        return (self.texts.query(query, f"{where}, field 'query'"),
                self.texts.response(response, f"{where}, field 'response'"))

    def score(self, queries: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """The rewards [n] (float32) of responses[i] to queries[i]."""
        if isinstance(queries, str) or isinstance(responses, str) or len(queries) != len(responses):
            raise ValueError("RewardScorer.score: expects two lists of texts of the same length (queries, responses)")
        pairs = [(self.texts.query(text_inputs.text_value(q, f"queries[{i}]"), f"queries[{i}]"),
                  self.texts.response(text_inputs.text_value(r, f"responses[{i}]"), f"responses[{i}]"))
                 for i, (q, r) in enumerate(zip(queries, responses))]
        if not pairs:
            return np.zeros([0], np.float32)
        return self.score_tokens(np.stack([q for q, _ in pairs]), np.stack([r for _, r in pairs])).rewards

    def score_tokens(self, queries: np.ndarray, responses: np.ndarray) -> Scores:
        """queries [n, query_length], responses [n, response_length] (before the truncate_token rule)."""
        if self.sess is None:
            self._build()
        scored = lm_tasks.postprocess_responses(responses, self.task, self.encoding.padding_token)
        model_rewards = np.concatenate([
            self.sess.run(self._rewards, {self._queries: queries[start:start + self.batch_size],
                                          self._responses: scored[start:start + self.batch_size]})
            for start in range(0, len(queries), self.batch_size)]).astype(np.float32)
        ended = lm_tasks.responses_are_valid(responses, self.task)
        return Scores(lm_tasks.apply_penalty(model_rewards, ended, self.task), model_rewards, ended)

    def _build(self):
        self.graph = tf.Graph()
        with self.graph.as_default():
            reward_model = rewards.RewardModel(self.trained_model, scope="reward_model")
            self._queries = tf.placeholder(tf.int32, [None, self.task.query_length], name="queries")
            self._responses = tf.placeholder(tf.int32, [None, self.task.response_length], name="responses")
            self._rewards = reward_model.get_rewards_op(self._queries, self._responses)  # [n]
            self.sess = devices.new_session()
            self.sess.run(tf.global_variables_initializer())  # loads the checkpoint (TrainedModel.init_op)

    def close(self):
        if self.sess is not None:
            self.sess.close()
            self.sess = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def score_texts(reward_model_dir: str, queries: Sequence[str], responses: Sequence[str], *,
                truncate: bool = False) -> np.ndarray:
    """One-shot RewardScorer(reward_model_dir).score(queries, responses): the rewards [n], float32."""
    with RewardScorer(reward_model_dir, truncate=truncate) as scorer:
        return scorer.score(queries, responses)


# ----- the command ------------------------------------------------------------------------------------------------

INPUT_FIELDS = ("query", "response")


def score_command(reward_model_dir: str, *, query: Optional[str] = None, response: Optional[str] = None,
                  input: Optional[str] = None, output: Optional[str] = None, truncate: bool = False):
    """`./launch.py score REWARD_MODEL_DIR --query TEXT --response TEXT` prints the reward;
    `... --input IN.jsonl [--output OUT.jsonl]` writes each record of IN.jsonl with a "reward" field added, to
    OUT.jsonl (a new file, written atomically) or to stdout. Every check happens before the model is built."""
    if input is None:
        if query is None or response is None:
            raise ValueError("score: give --query TEXT and --response TEXT (one pair), or --input IN.jsonl (records "
                             "{\"query\": ..., \"response\": ...})")
        if output is not None:
            raise ValueError("--output applies to --input IN.jsonl; one --query/--response pair is printed")
        records = [("--query/--response", {"query": text_inputs.text_value(query, "--query"),
                                           "response": text_inputs.text_value(response, "--response")})]
    else:
        if query is not None or response is not None:
            raise ValueError("score: give either --input IN.jsonl or one --query/--response pair, not both")
        input = text_inputs.text_value(input, "--input")
        if output is not None:
            output = text_inputs.check_new_output(text_inputs.text_value(output, "--output"), "--output")
        records = text_inputs.read_jsonl(input)
        for where, record in records:
            for name in INPUT_FIELDS:
                text_inputs.text_field(record, name, where, INPUT_FIELDS)
    scorer = RewardScorer(reward_model_dir, truncate=truncate, truncate_hint="--truncate")
    if input is None:
        pairs = [(scorer.texts.query(query, "--query"), scorer.texts.response(response, "--response"))]
    else:
        pairs = [scorer.encode(record["query"], record["response"], where) for where, record in records]
    with scorer:
        scores = scorer.score_tokens(np.stack([q for q, _ in pairs]), np.stack([r for _, r in pairs]))
    for (where, _), ended, model_reward in zip(records, scores.ended, scores.model_rewards):
        if not ended:
            _say_penalised(where, scorer, model_reward)
    if input is None:
        print(repr(float(scores.rewards[0])))
        return
    lines = [json.dumps({**record, "reward": float(reward)}, ensure_ascii=False)
             for (_, record), reward in zip(records, scores.rewards)]
    if output is None:
        print("\n".join(lines))
        return
    text_inputs.write_new_output(output, "\n".join(lines) + "\n", "--output")
    print(f"wrote {len(lines)} rewards of {scorer.model_dir} to {output}", file=sys.stderr)


def _say_penalised(where: str, scorer: RewardScorer, model_reward: float):
    task = scorer.task
    token = scorer.encoder.decode([task.truncate_token])
    print(f"{where}: the response never ends (no {token!r} at token {task.truncate_after} or later), so its reward "
          f"is the task's penalty {task.penalty_reward_value} (the reward model's score: {model_reward:.6g})",
          file=sys.stderr)
