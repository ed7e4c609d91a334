"""The task: text -> query, the query stream (2019 order, repeat, shard), the policy's context, post-processing."""
import dataclasses
import itertools
import json
import random

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences import lm_tasks
from lm_human_preferences.language import encodings
from lm_human_preferences.utils.hyperparams import HParamError

ENCODER = encodings.get("test").get_encoder()  # "abcdefghijklmnopqrstuvwxyz." one token each; padding 27
PAD = 27


def task(**overrides):
    settings = dict(query_length=8, query_dataset="test", response_length=6,
                    policy=lm_tasks.PolicyHParams(initial_model="test"))
    settings.update(overrides)
    return lm_tasks.TaskHParams(**settings)


def tokens(text):
    return ENCODER.encode(text)


def padded(text, length=8):
    return tokens(text) + [PAD] * (length - len(text))


def books_file(tmp_path, texts, name="books.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(t) + "\n" for t in texts))
    return str(path)


# ----- hyperparameters ---------------------------------------------------------------------------------------

def test_task_hparams_names_and_2019_defaults():
    fields = {f.name: f for f in dataclasses.fields(lm_tasks.TaskHParams)}
    assert list(fields) == ["query_length", "query_dataset", "query_prefix", "query_suffix", "start_text",
                            "end_text", "response_length", "truncate_token", "truncate_after",
                            "penalty_reward_value", "policy", "query_source"]
    hparams = lm_tasks.TaskHParams()
    assert (hparams.query_length, hparams.query_dataset, hparams.query_prefix, hparams.query_suffix) == \
        (None, None, "", "")
    assert (hparams.start_text, hparams.end_text, hparams.response_length) == (".", None, None)
    assert (hparams.truncate_token, hparams.truncate_after, hparams.penalty_reward_value) == (None, 0, -1)
    assert (hparams.policy.temperature, hparams.policy.initial_model, hparams.query_source) == (1.0, None, None)


@pytest.mark.parametrize("overrides, message", [
    (dict(query_length=0), r"task.query_length must be positive"),
    (dict(response_length=-1), r"task.response_length must be positive"),
    (dict(response_length=0), r"task.response_length must be positive, got 0"),
    (dict(query_dataset="wiki"), r"task.query_dataset: unknown dataset 'wiki'; known datasets: books, tldr"),
    (dict(truncate_after=-2), r"task.truncate_after must be >= 0"),
    # the one check of the sampling temperature (the policy and the sampler take it as given)
    (dict(policy=lm_tasks.PolicyHParams(temperature=0, initial_model="test")), "temperature must be > 0"),
])
def test_task_hparams_are_checked(overrides, message):
    with pytest.raises(HParamError, match=message):
        task(**overrides).validate("task.")


def test_task_hparams_accept_their_smallest_values():
    task(query_length=1, response_length=1, truncate_after=0,
         policy=lm_tasks.PolicyHParams(temperature=0.5, initial_model="test")).validate("task.")


# ----- text -> query -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, settings, expected", [
    ("abc.defgh.ij", dict(), "defgh.ij"),  # after the first ".", cut to 8
    ("abc.de", dict(), "de"),  # right-padded
    ("abc.defgh.ijk.", dict(end_text="."), "defgh."),  # cut after the last "." within the 8 tokens
    ("xx.a.b.c.d.e.f.g", dict(end_text="."), "a.b.c.d."),
    ("abcdefghijkl", dict(start_text=None), "abcdefgh"),
    ("ab.cdzzefgh", dict(start_text="cd"), "zzefgh"),  # multi-token start text
    ("ab.cdzz.efzz", dict(end_text="zz"), "cdzz"),  # "cdzz.efz": the last whole "zz" ends the query
    ("one.two", dict(start_text="."), "two"),
    ("a.b.", dict(), "b."),  # the FIRST "." counts, even with another one at the end
])
def test_make_query(text, settings, expected):
    query = lm_tasks.make_query(text, task(**settings), ENCODER)
    assert query.dtype == np.int32 and query.tolist() == padded(expected)


@pytest.mark.parametrize("text, settings, expected", [
    ("abc.", dict(), "abc."),  # start_text is the last token: 2019 keeps the whole text
    (".", dict(), "."),
    ("abcdefghij.", dict(), "abcdefgh"),  # ... and then cuts it to query_length
    ("ab.cd", dict(start_text="cd"), "ab.cd"),  # a multi-token start text ending at the last token
    ("abc.", dict(end_text="."), "abc."),
    ("", dict(start_text=None), ""),  # an empty text is an all-padding query, not skipped
    ("a.", dict(end_text="a"), "a"),  # the whole text kept, then cut after end_text
])
def test_make_query_edge_cases_as_2019(text, settings, expected):
    query = lm_tasks.make_query(text, task(**settings), ENCODER)
    assert query is not None and query.tolist() == padded(expected)


@pytest.mark.parametrize("text, settings", [
    ("nostarttexthere", dict()),  # no start_text: skipped
    ("", dict()),
    ("a.bcdefghij.", dict(end_text=".")),  # the end text lies beyond query_length
    ("ab.cd", dict(start_text="dc")),
])
def test_make_query_skips(text, settings):
    assert lm_tasks.make_query(text, task(**settings), ENCODER) is None


def test_make_query_with_gpt2_tokens():
    encoder = encodings.get("main").get_encoder()
    query = lm_tasks.make_query("Title. It was cold. Snow fell. The end", task(query_length=6, end_text="."),
                                encoder)
    # " It was cold. Snow fell." is 7 tokens; cut to 6 then after the last "." (13): " It was cold."
    assert query.tolist() == encoder.encode(" It was cold.") + [50259, 50259]


# ----- batches: the 2019 order, repeated, sharded ------------------------------------------------------------

TEXTS = [f".{a}{b}" for a in "abcdefgh" for b in "abcde"]  # 40 distinct one-line passages
# 25 texts with a query (distinct two letters after the first "."), 12 without a "." (skipped); 25 is odd, so
# which rank gets a text changes from one pass to the next
MIXED = [f"x.{a}{b}" for a in "abcde" for b in "vwxyz"] + [f"none{a}{b}" for a in "fg" for b in "abcdef"]


def take(batches, count):
    return [b.copy() for b in itertools.islice(batches, count)]


def decoded(batches, count):
    return [ENCODER.decode(q) for q in np.concatenate(take(batches, count))]


def order_of_2019(texts):
    """The texts in the order the 2019 code read them: random.seed(0); random.shuffle (a generator of its own
    seeded 0 gives the same permutation; tests/test_datasets.py checks against the global one)."""
    order = list(texts)
    random.Random(0).shuffle(order)
    return order


def stream_of_2019(texts, passes):
    """The queries of `passes` passes over MIXED-like texts with query_length 2: every pass replays the same
    order, texts without a "." give no query."""
    one_pass = [t[t.index(".") + 1:][:2] for t in order_of_2019(texts) if "." in t]
    return one_pass * passes


def test_batches_are_int32_query_arrays(tmp_path):
    hparams = task(query_dataset="books", query_source=books_file(tmp_path, TEXTS), query_length=4)
    batch = next(lm_tasks.query_batches(hparams, ENCODER, 5, rank=0, size=1))
    assert batch.dtype == np.int32 and batch.shape == (5, 4)
    assert {ENCODER.decode(q) for q in batch} <= {t[1:] for t in TEXTS}
    assert (batch[:, 2:] == PAD).all()


def test_query_stream_is_the_2019_order_repeated(tmp_path):
    """Shuffled as 2019 (random.seed(0), whatever the run's seed), the same order every pass, texts without a
    query skipped; batches of 7 straddle the pass boundaries (25 queries a pass)."""
    hparams = task(query_dataset="books", query_source=books_file(tmp_path, MIXED), query_length=2)
    expected = stream_of_2019(MIXED, passes=3)
    assert expected[:25] != sorted(expected[:25])  # the order is shuffled
    for seed in (0, 7):
        assert decoded(lm_tasks.query_batches(hparams, ENCODER, 7, seed=seed, rank=0, size=1), 10) == expected[:70]


def test_ranks_shard_the_filtered_stream_round_robin(tmp_path):
    """Query i of the stream (counting across passes, after skipping texts without a query) goes to rank
    i mod size: a skipped text does not shift the sharding, and an odd pass alternates the ranks' texts."""
    hparams = task(query_dataset="books", query_source=books_file(tmp_path, MIXED), query_length=2)
    expected = stream_of_2019(MIXED, passes=4)
    for rank in (0, 1):
        share = decoded(lm_tasks.query_batches(hparams, ENCODER, 5, seed=3, rank=rank, size=2), 8)
        assert share == expected[rank::2][:40]


def test_more_ranks_than_texts_take_turns_across_passes(tmp_path):
    hparams = task(query_dataset="books", query_source=books_file(tmp_path, [".a", ".b"]), query_length=1)
    expected = [t[1:] for t in order_of_2019([".a", ".b"])] * 6
    for rank in range(3):
        assert decoded(lm_tasks.query_batches(hparams, ENCODER, 2, rank=rank, size=3), 2) == expected[rank::3][:4]


def test_endless_dataset_is_sharded_round_robin():
    hparams = task(start_text=None, query_length=40)
    single = np.concatenate(take(lm_tasks.query_batches(hparams, ENCODER, 3, seed=2, rank=0, size=1), 4))
    rank1 = np.concatenate(take(lm_tasks.query_batches(hparams, ENCODER, 3, seed=2, rank=1, size=2), 2))
    np.testing.assert_array_equal(rank1, single[1::2])


def test_endless_dataset_is_sharded_after_skipping_texts():
    """About a fifth of the test strings have no "." and give no query; the ranks share the queries made."""
    hparams = task(query_length=8)
    single = np.concatenate(take(lm_tasks.query_batches(hparams, ENCODER, 5, seed=2, rank=0, size=1), 12))
    for rank in (0, 1):
        share = np.concatenate(take(lm_tasks.query_batches(hparams, ENCODER, 5, seed=2, rank=rank, size=2), 6))
        np.testing.assert_array_equal(share, single[rank::2])


def test_endless_dataset_depends_on_the_seed_and_mode():
    def first(seed, mode):
        return next(lm_tasks.query_batches(task(), ENCODER, 4, mode=mode, seed=seed, rank=0, size=1)).tolist()

    assert first(1, "train") == first(1, "train")
    assert first(1, "train") != first(2, "train") and first(1, "train") != first(1, "test")


def test_texts_without_start_text_are_skipped(tmp_path):
    texts = ["nomarker", ".kept", "stillnone", ".also"]
    hparams = task(query_dataset="books", query_source=books_file(tmp_path, texts), query_length=4)
    batch = next(lm_tasks.query_batches(hparams, ENCODER, 6, rank=0, size=1))
    assert {ENCODER.decode(q) for q in batch} == {"kept", "also"}


def test_a_dataset_without_any_usable_text_is_an_error(tmp_path):
    hparams = task(query_dataset="books", query_source=books_file(tmp_path, ["abc", "def"]), end_text="x")
    with pytest.raises(ValueError, match=r"dataset books \(train\): none of its 2 texts gave a query.*"
                                         r"start_text '\.'"):
        next(lm_tasks.query_batches(hparams, ENCODER, 2, rank=0, size=1))
    with pytest.raises(ValueError, match=r"dataset test \(train\): none of the first 10000 texts gave a query"):
        next(lm_tasks.query_batches(task(start_text="zzzzzzz"), ENCODER, 2, rank=0, size=1))


@pytest.mark.parametrize("usable_first, unusable, refused", [(0, 9_999, False), (0, 10_000, True), (1, 10_000, False)])
def test_an_endless_dataset_is_refused_after_ten_thousand_texts_without_a_query(monkeypatch, usable_first, unusable,
                                                                                refused):
    """Refused when none of its first 10,000 texts gave a query; once one has, unusable texts are only skipped."""
    def endless(mode, **kwargs):
        for _ in range(usable_first):
            yield ".abc"
        for _ in range(unusable):
            yield "nostarttext"
        while True:
            yield ".abc"

    monkeypatch.setitem(lm_tasks.datasets.DATASETS, "books", endless)
    batches = lm_tasks.query_batches(task(query_dataset="books"), ENCODER, 2, rank=0, size=1)
    if refused:
        with pytest.raises(ValueError, match=r"dataset books \(train\): none of the first 10000 texts gave a query"):
            next(batches)
    else:
        assert [ENCODER.decode(q) for q in next(batches)] == ["abc", "abc"]


def test_rank_and_size_come_together():
    for rank, size in ((0, None), (None, 2)):
        with pytest.raises(ValueError, match=rf"query_batches: give both rank and size, or neither "
                                             rf"\(got rank={rank}, size={size}\)"):
            next(lm_tasks.query_batches(task(), ENCODER, 2, rank=rank, size=size))


def test_only_the_texts_used_are_read(monkeypatch):
    """A large dataset starts at once: texts are made (read, cleaned, encoded) as they are consumed."""
    made = []
    texts = lm_tasks.datasets.LazyTexts(range(100_000), lambda i: made.append(i) or ".abc")
    monkeypatch.setitem(lm_tasks.datasets.DATASETS, "books", lambda mode, **kwargs: texts)
    next(lm_tasks.query_batches(task(query_dataset="books"), ENCODER, 10, rank=0, size=1))
    assert made == list(range(10))


def test_a_rank_makes_the_queries_of_the_texts_before_its_own(monkeypatch):
    """As in 2019, each rank filters every text up to its share: it cannot know the stream positions (which
    depend on the texts skipped) otherwise."""
    made = []
    texts = lm_tasks.datasets.LazyTexts(range(100_000), lambda i: made.append(i) or ".abc")
    monkeypatch.setitem(lm_tasks.datasets.DATASETS, "books", lambda mode, **kwargs: texts)
    next(lm_tasks.query_batches(task(query_dataset="books"), ENCODER, 10, rank=1, size=2))
    assert made == list(range(20))


def test_files_are_fetched_collectively_only_when_every_rank_reads(monkeypatch):
    """Without rank/size every MPI rank iterates, so a remote file is fetched once per machine; with them
    (e.g. rank=0, size=1 on the root alone) a collective fetch would wait for ranks that never come."""
    calls = []
    monkeypatch.setitem(lm_tasks.datasets.DATASETS, "books",
                        lambda mode, **kwargs: calls.append(kwargs) or [".abc"])
    hparams = task(query_dataset="books", query_source="https://example.com/books.jsonl")
    next(lm_tasks.query_batches(hparams, ENCODER, 1, seed=4))
    next(lm_tasks.query_batches(hparams, ENCODER, 1, rank=0, size=1))
    assert calls == [dict(source="https://example.com/books.jsonl", seed=4, collective=True),
                     dict(source="https://example.com/books.jsonl", seed=0, collective=False)]


def test_rank_and_size_default_to_the_mpi_world(tmp_path):
    hparams = task(query_dataset="books", query_source=books_file(tmp_path, TEXTS), query_length=2)
    np.testing.assert_array_equal(next(lm_tasks.query_batches(hparams, ENCODER, 8, seed=3)),
                                  next(lm_tasks.query_batches(hparams, ENCODER, 8, seed=3, rank=0, size=1)))


# ----- the policy's context ----------------------------------------------------------------------------------

def run(tensor):
    with tf.Session() as sess:
        return sess.run(tensor)


def test_query_formatter_adds_prefix_and_suffix():
    queries = np.array([padded("abc"), padded("defghijk")], np.int32)
    placeholder = tf.placeholder(tf.int32, [None, 8])
    formatted = lm_tasks.query_formatter(task(query_prefix="zz", query_suffix=".x."), ENCODER)(placeholder)
    assert formatted.shape.as_list() == [None, 2 + 8 + 3]  # [b, prefix + query_length + suffix]
    expected = np.concatenate([np.tile(tokens("zz"), (2, 1)), queries, np.tile(tokens(".x."), (2, 1))], axis=1)
    with tf.Session() as sess:
        np.testing.assert_array_equal(sess.run(formatted, {placeholder: queries}), expected)


@pytest.mark.parametrize("prefix, suffix", [("zz", ""), ("", ".x.")])
def test_query_formatter_with_only_a_prefix_or_only_a_suffix(prefix, suffix):
    queries = np.array([padded("abc"), padded("de")], np.int32)
    formatted = run(lm_tasks.query_formatter(task(query_prefix=prefix, query_suffix=suffix), ENCODER)(queries))
    expected = [tokens(prefix) + q + tokens(suffix) for q in queries.tolist()]
    assert formatted.tolist() == expected


def test_query_formatter_without_prefix_or_suffix_is_the_identity():
    queries = np.array([padded("abc")], np.int32)
    np.testing.assert_array_equal(run(lm_tasks.query_formatter(task(), ENCODER)(queries)), queries)


def test_query_formatter_with_gpt2_tldr_suffix():
    encoder = encodings.get("main").get_encoder()
    hparams = task(query_prefix="Article:\n\n", query_suffix="\n\nTL;DR:")
    queries = np.full([3, 8], 50259, np.int32)
    formatted = run(lm_tasks.query_formatter(hparams, encoder)(tf.constant(queries)))
    prefix, suffix = encoder.encode("Article:\n\n"), encoder.encode("\n\nTL;DR:")
    assert formatted.shape == (3, len(prefix) + 8 + len(suffix))
    assert formatted[0].tolist() == prefix + [50259] * 8 + suffix


# ----- responses ---------------------------------------------------------------------------------------------

def reference_postprocess(response, truncate_token, truncate_after):
    """Plain loop: keep tokens up to the first truncate_token at index >= truncate_after, pad the rest."""
    out = list(response)
    for i in range(truncate_after, len(out)):
        if out[i] == truncate_token:
            return out[:i + 1] + [PAD] * (len(out) - i - 1), True
    return out, False


@pytest.mark.parametrize("truncate_after", [3, 0])  # 0: a response may end at its very first token
def test_postprocessing_matches_a_loop_reference(truncate_after):
    rng = np.random.RandomState(0)
    responses = rng.randint(0, 5, size=(200, 10)).astype(np.int32)  # token 4 is frequent
    hparams = task(truncate_token=4, truncate_after=truncate_after)
    result = lm_tasks.postprocess_responses(responses, hparams, PAD)
    valid = lm_tasks.responses_are_valid(responses, hparams)
    assert (responses[:, 0] == 4).sum() > 10  # rows that end at index 0 are among them
    for row, out, ok in zip(responses, result, valid):
        expected, expected_ok = reference_postprocess(row.tolist(), 4, truncate_after)
        assert out.tolist() == expected and ok == expected_ok
    assert valid.dtype == bool and 0 < valid.sum() < 200
    assert (responses == np.random.RandomState(0).randint(0, 5, size=(200, 10))).all()  # input untouched


def test_postprocessing_examples():
    hparams = task(truncate_token=26, truncate_after=2)  # "."
    responses = np.array([tokens("a.b.cd"), tokens("ab.c.d"), tokens("abcdef")], np.int32)
    assert [ENCODER.decode(r) for r in lm_tasks.postprocess_responses(responses, hparams, PAD)] == \
        ["a.b.", "ab.", "abcdef"]  # the "." at index 1 is before truncate_after
    assert lm_tasks.responses_are_valid(responses, hparams).tolist() == [True, True, False]


def test_without_truncate_token_responses_are_kept_and_valid():
    responses = np.array([tokens("a.b.cd")], np.int32)
    np.testing.assert_array_equal(lm_tasks.postprocess_responses(responses, task(), PAD), responses)
    valid = lm_tasks.responses_are_valid(responses, task())
    assert valid.dtype == bool and valid.tolist() == [True]


def test_postprocessed_responses_are_int32_whatever_they_came_as():
    for hparams in (task(), task(truncate_token=26)):
        result = lm_tasks.postprocess_responses([tokens("a.b.cd")], hparams, PAD)  # a list of Python ints
        assert result.dtype == np.int32


def test_penalty_replaces_the_scores_of_invalid_responses():
    scores = np.array([0.5, -2.0, 3.0], np.float32)
    valid = np.array([True, False, True])
    penalised = lm_tasks.apply_penalty(scores, valid, task(penalty_reward_value=-7))
    assert penalised.dtype == np.float32 and penalised.tolist() == [0.5, -7.0, 3.0]
