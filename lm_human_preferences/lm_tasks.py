"""The language task: which queries the policy sees (in the 2019 order), how they are formatted, and how its
responses are cut before they are scored. The rules, step by step: docs/formats.md (Queries)."""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import numpy as np

from lm_human_preferences.language import datasets
from lm_human_preferences.utils import hyperparams
from lm_human_preferences.utils.hyperparams import require


@dataclass
class PolicyHParams(hyperparams.HParams):
    temperature: float = 1.0  # sampling temperature of the policy (logits are divided by it)
    initial_model: str = None  # model the policy, reference policy and reward model start from (124M, test, a dir)


@dataclass
class TaskHParams(hyperparams.HParams):
    query_length: int = None  # tokens per query (right-padded)
    query_dataset: str = None  # books, tldr, cnndm or test
    query_prefix: str = ""  # text put before each query in the policy's context
    query_suffix: str = ""  # text put after each query in the policy's context (e.g. "\n\nTL;DR:")
    start_text: Optional[str] = "."  # queries start after the first occurrence of this text (none: at the start)
    end_text: Optional[str] = None  # queries end after the last occurrence of this text within query_length
    response_length: int = None  # tokens the policy samples per query
    truncate_token: Optional[int] = None  # a response ends at the first of these at index >= truncate_after
    truncate_after: int = 0  # earliest index at which truncate_token ends a response
    penalty_reward_value: int = -1  # score of a response that never ends (no truncate_token after truncate_after)
    policy: PolicyHParams = field(default_factory=PolicyHParams)
    query_source: Optional[str] = None  # where the dataset's files are read from (books' 2019 URL is gone)

    def check(self, prefix):
        require(self.query_length > 0, f"{prefix}query_length must be positive, got {self.query_length}")
        require(self.response_length > 0, f"{prefix}response_length must be positive, got {self.response_length}")
        require(self.query_dataset in datasets.DATASETS,
                f"{prefix}query_dataset: unknown dataset {self.query_dataset!r}; "
                f"known datasets: {', '.join(datasets.DATASETS)}")
        require(self.truncate_after >= 0, f"{prefix}truncate_after must be >= 0, got {self.truncate_after}")
        require(self.policy.temperature > 0, f"{prefix}policy.temperature must be > 0, got {self.policy.temperature}")


# ----- queries ---------------------------------------------------------------------------------------------------

def _find(tokens: List[int], pattern: List[int], last: bool = False) -> int:
    """Index of the first (or last) occurrence of `pattern` in `tokens`, or -1."""
    starts = range(len(tokens) - len(pattern), -1, -1) if last else range(len(tokens) - len(pattern) + 1)
    return next((i for i in starts if tokens[i:i + len(pattern)] == pattern), -1)


def make_query(text: str, task: TaskHParams, encoder) -> Optional[np.ndarray]:
    """One query [query_length] from a text, or None to skip the text, by the 2019 rules: drop everything up
    to and including the first start_text (skip the text without one; if that start_text ends the text, keep
    the whole text); cut to query_length; cut after the last end_text within them (skip the text without
    one); right-pad with the padding token. A text that leaves no tokens gives an all-padding query."""
    tokens = encoder.encode(text)
    if task.start_text:
        start = encoder.encode(task.start_text)
        found = _find(tokens, start)
        if found < 0:
            return None
        if found + len(start) < len(tokens):  # 2019 kept the whole text when nothing followed start_text
            tokens = tokens[found + len(start):]
    tokens = tokens[:task.query_length]
    if task.end_text:
        end = encoder.encode(task.end_text)
        found = _find(tokens, end, last=True)
        if found < 0:
            return None
        tokens = tokens[:found + len(end)]
    query = np.full(task.query_length, encoder.padding_token, np.int32)
    query[:len(tokens)] = tokens
    return query


def _query_stream(task: TaskHParams, encoder, mode: str, seed: int, collective: bool) -> Iterator[np.ndarray]:
    """The queries of all ranks, forever, in the 2019 order. A finite dataset comes in its fixed 2019 order
    and every pass replays it (2019's `.repeat()` re-ran the same seeded shuffle); texts that give no query
    are skipped. Texts are read and encoded only as the stream reaches them."""
    texts = datasets.get(task.query_dataset)(mode, source=task.query_source, seed=seed, collective=collective)
    if isinstance(texts, Sequence):
        while True:
            made_any = False
            for index in range(len(texts)):
                query = make_query(texts[index], task, encoder)
                if query is not None:
                    made_any = True
                    yield query
            if not made_any:  # every pass is the same: none will ever give a query
                raise ValueError(_no_queries_message(task, mode, f"none of its {len(texts)} texts"))
    made_any = False
    for seen, text in enumerate(texts, start=1):  # an endless dataset never ends a pass
        query = make_query(text, task, encoder)
        if query is not None:
            made_any = True
            yield query
        elif not made_any and seen == 10_000:
            raise ValueError(_no_queries_message(task, mode, "none of the first 10000 texts"))


def query_batches(task: TaskHParams, encoder, batch_size: int, *, mode: str = "train", seed: int = 0,
                  rank: Optional[int] = None, size: Optional[int] = None) -> Iterator[np.ndarray]:
    """Endless batches of queries, int32 [batch_size, query_length], for this MPI rank, as in 2019: the
    stream of queries (see _query_stream) is sharded round robin, query i (counting across passes) to rank
    i mod size, then batched. `seed` only matters for the endless `test` dataset: finite datasets have one
    order whatever the run's seed, as in 2019.

    Sharding the queries rather than the texts keeps a skipped text from shifting the ranks' shares, but each
    rank makes the queries of every text up to its own (it cannot know the stream positions otherwise): size
    times the encoding work of sharding texts, as 2019 did too.

    Without rank/size, every rank of the MPI world must iterate (remote files are fetched once per machine);
    with them, the caller may run this on one rank alone (rank=0, size=1) and its files are fetched there."""
    if (rank is None) != (size is None):
        raise ValueError(f"query_batches: give both rank and size, or neither (got rank={rank}, size={size})")
    collective = rank is None
    if collective:
        from lm_human_preferences.utils import mpi
        rank, size = mpi.rank(), mpi.size()
    stream = _query_stream(task, encoder, mode, seed, collective)
    batch = []
    for query in itertools.islice(stream, rank, None, size):
        batch.append(query)
        if len(batch) == batch_size:
            yield np.stack(batch)  # [batch_size, query_length]
            batch = []


def _no_queries_message(task: TaskHParams, mode: str, which: str) -> str:
    return (f"dataset {task.query_dataset} ({mode}): {which} gave a query: each needs start_text "
            f"{task.start_text!r} and then end_text {task.end_text!r} within query_length {task.query_length} "
            f"tokens; check task.start_text / task.end_text / task.query_source")


def query_formatter(task: TaskHParams, encoder):
    """The graph function that turns queries [b, query_length] into the policy's context
    [b, prefix + query_length + suffix]: encode(query_prefix) + query + encode(query_suffix)."""
    import tensorflow.compat.v1 as tf
    prefix = np.asarray(encoder.encode(task.query_prefix), np.int32)
    suffix = np.asarray(encoder.encode(task.query_suffix), np.int32)

    def embed_queries(queries):
        queries = tf.convert_to_tensor(queries, tf.int32)
        batch = tf.shape(queries)[0]
        parts = [tf.tile(tf.constant(prefix)[None], [batch, 1])] if len(prefix) else []
        parts.append(queries)
        if len(suffix):
            parts.append(tf.tile(tf.constant(suffix)[None], [batch, 1]))
        return tf.concat(parts, axis=1) if len(parts) > 1 else queries

    return embed_queries


# ----- responses -------------------------------------------------------------------------------------------------

def _first_truncation(responses: np.ndarray, task: TaskHParams) -> np.ndarray:
    """Index of the first truncate_token at index >= truncate_after in each response, or -1. [b]"""
    hits = responses == task.truncate_token
    hits[:, :task.truncate_after] = False
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def postprocess_responses(responses: np.ndarray, task: TaskHParams, padding_token: int) -> np.ndarray:
    """Tokens after the first truncate_token (at index >= truncate_after) become padding, before scoring."""
    responses = np.array(responses, dtype=np.int32, copy=True)
    if task.truncate_token is None:
        return responses
    first = _first_truncation(responses, task)
    after = np.arange(responses.shape[1])[None, :] > first[:, None]
    responses[after & (first[:, None] >= 0)] = padding_token
    return responses


def responses_are_valid(responses: np.ndarray, task: TaskHParams) -> np.ndarray:
    """bool [b]: the response ends (has a truncate_token at index >= truncate_after); all valid without one."""
    if task.truncate_token is None:
        return np.ones(len(responses), bool)
    return _first_truncation(np.asarray(responses), task) >= 0


def apply_penalty(scores: np.ndarray, valid: np.ndarray, task: TaskHParams) -> np.ndarray:
    """Responses that never end score penalty_reward_value instead of the reward model's score."""
    return np.where(valid, scores, np.float32(task.penalty_reward_value)).astype(np.float32)
