"""A synthetic labeler for the offline demo: a programmatic judge with a known preference plays the human.

A judge maps (query text, response text) to a score. `make_records` turns queries and policy samples into
label records in exactly the released JSON format:

* best_of_N:      {"query": [...], "sample0": [...], ..., "sample{N-1}": [...], "best": int}
* scalar_rating:  {"query": [...], "sample": [...], "score": float}
* scalar_compare: {"query": [...], "sample0": [...], "sample1": [...], "difference": float}  # judge(s1) − judge(s0)

`temperature` is the judge's noise, in judge-score units: a best_of_N choice is drawn from a softmax over
the scores at that temperature (0: always the best, ties broken at random), as a human who sometimes picks
a worse sample; scalar labels get Gaussian noise with that standard deviation (0: exact).

`label_samples` runs the labelling loop over any sampler; `label_command` (`./launch.py label`) samples an
experiment's initial policy and writes a label file. TensorFlow is imported only inside `label_command`.
"""

import json
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lm_human_preferences.utils import files

Judge = Callable[[str, str], float]  # (query text, response text) -> score

VOWELS = "aeiou"


def letter_density(letter: str) -> Judge:
    """A judge that prefers responses in which `letter` is frequent: the fraction of the response's characters
    that are `letter`, either case (0 for an empty response)."""
    letter = letter.lower()

    def judge(query: str, response: str) -> float:
        return response.lower().count(letter) / len(response) if response else 0.0
    judge.__name__ = f"letter_{letter}"
    return judge


def vowel_density(query: str, response: str) -> float:
    """A judge that prefers vowel-rich responses: the fraction of the response's characters that are a, e,
    i, o or u, either case (0 for an empty response)."""
    if not response:
        return 0.0
    lowered = response.lower()
    return sum(lowered.count(vowel) for vowel in VOWELS) / len(response)


# name pattern -> (judge factory given the pattern's match, what it prefers)
JUDGES: Dict[str, Tuple[Callable[[re.Match], Judge], str]] = {
    r"letter_([a-zA-Z])": (lambda match: letter_density(match.group(1)),
                           "letter_X: the fraction of the response's characters that are the letter X (e.g. letter_e)"),
    r"vowels": (lambda match: vowel_density, "vowels: the fraction of the response's characters that are vowels"),
}


def get_judge(name: str) -> Judge:
    """The judge called `name` (see JUDGES); a ValueError lists the known ones."""
    for pattern, (make_judge, _) in JUDGES.items():
        match = re.fullmatch(pattern, name or "")
        if match:
            return make_judge(match)
    raise ValueError(f"unknown judge {name!r}; known judges: " + "; ".join(what for _, what in JUDGES.values()))


def judge_scores(judge: Judge, encoder, queries: np.ndarray, responses: np.ndarray) -> np.ndarray:
    """The judge's scores of decoded responses. queries [b, query_length], responses [b, response_length]
    -> [b] float64 (padding decodes to nothing)."""
    return np.array([judge(encoder.decode(query), encoder.decode(response))
                     for query, response in zip(queries, responses)], np.float64)


def choose(scores: Sequence[float], temperature: float, rng: np.random.RandomState) -> int:
    """The judge's pick among samples with these scores: at temperature 0 the best (ties at random, so that
    equal samples show no position bias), else a draw from softmax(scores / temperature)."""
    scores = np.asarray(scores, np.float64)
    if temperature < 0:
        raise ValueError(f"the judge's temperature must be >= 0 (0 = always its best), got {temperature}")
    if temperature == 0:
        return int(rng.choice(np.flatnonzero(scores == scores.max())))
    logits = (scores - scores.max()) / temperature  # shifted so that exp cannot overflow
    probabilities = np.exp(logits) / np.exp(logits).sum()
    return int(rng.choice(len(scores), p=probabilities))


def _record_layout(label_type) -> Tuple[str, int]:
    """('best_of_N' | 'scalar_rating' | 'scalar_compare', samples per record) from a label type or its name."""
    name = label_type if isinstance(label_type, str) else getattr(label_type, "name", None)
    match = re.fullmatch(r"best_of_(\d+)", name or "")
    if match and int(match.group(1)) >= 2:
        return "best_of_N", int(match.group(1))
    if name == "scalar_rating":
        return name, 1
    if name == "scalar_compare":
        return name, 2
    raise ValueError(f"the labeler cannot make {name!r} labels; accepted label types: best_of_N (N >= 2, "
                     "e.g. best_of_4), scalar_rating, scalar_compare")


def _tokens(row) -> List[int]:
    return [int(token) for token in row]  # numpy ints are not JSON; the released files hold plain ints


def make_records(label_type, queries: np.ndarray, samples: Sequence[np.ndarray], judge: Judge, encoder,
                 temperature: float, rng: np.random.RandomState) -> List[dict]:
    """Label records in the released format, one per query.

    label_type: a `label_types.LabelType` or its name; queries: [b, query_length] token ids;
    samples: the label type's number of samples per record, each [b, response_length] (sample i of every
    query), e.g. 4 arrays for best_of_4; judge: see `get_judge`; encoder: decodes tokens for the judge;
    temperature: the judge's noise (module docstring); rng: all randomness (ties, choices, noise)."""
    layout, num_samples = _record_layout(label_type)
    if temperature < 0:
        raise ValueError(f"the judge's temperature must be >= 0 (0 = no noise), got {temperature}")
    queries = np.asarray(queries)
    samples = [np.asarray(sample) for sample in samples]
    if len(samples) != num_samples:
        raise ValueError(f"{layout} records need {num_samples} samples per query, got {len(samples)}")
    for index, sample in enumerate(samples):
        if sample.ndim != 2 or sample.shape[0] != queries.shape[0]:
            raise ValueError(f"sample {index} must be [batch={queries.shape[0]}, response_length] token ids, "
                             f"got shape {sample.shape}")
    scores = np.stack([judge_scores(judge, encoder, queries, sample) for sample in samples], axis=1)  # [b, N]

    records = []
    for i, query in enumerate(queries):
        record = {"query": _tokens(query)}
        if layout == "best_of_N":
            record.update({f"sample{n}": _tokens(sample[i]) for n, sample in enumerate(samples)})
            record["best"] = choose(scores[i], temperature, rng)
        elif layout == "scalar_rating":
            record["sample"] = _tokens(samples[0][i])
            record["score"] = float(scores[i, 0] + temperature * rng.standard_normal())
        else:  # scalar_compare
            record["sample0"], record["sample1"] = _tokens(samples[0][i]), _tokens(samples[1][i])
            record["difference"] = float(scores[i, 1] - scores[i, 0] + temperature * rng.standard_normal())
        records.append(record)
    return records


def write_label_file(path: str, records: List[dict]):
    """Write records as a JSON list, atomically (temporary file + rename: a reader never sees half a file)."""
    files.write_text_atomic(path, json.dumps(records) + "\n")


# ----- labelling policy samples -----------------------------------------------------------------------------------

def label_samples(sample: Callable[[np.ndarray], np.ndarray], query_batches: Iterator[np.ndarray], label_type,
                  judge: Judge, encoder, count: int, temperature: float, rng: np.random.RandomState) -> List[dict]:
    """`count` records: for each batch of queries [b, query_length], the label type's number of samples drawn
    with `sample(queries) -> [b, response_length]` (already post-processed, as the labelers saw them), judged."""
    _, num_samples = _record_layout(label_type)
    records = []
    while len(records) < count:
        queries = next(query_batches)  # [b, query_length]
        samples = [sample(queries) for _ in range(num_samples)]  # each [b, response_length]
        records.extend(make_records(label_type, queries, samples, judge, encoder, temperature, rng))
    return records[:count]


def _parse_number(value, kind, flag: str, accepted: str, minimum):
    """A command-line number of `kind` (int or float), at least `minimum`: the CLI hands values over as text."""
    try:
        number = None if isinstance(value, bool) else kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or (kind is int and number != float(value)):  # int(2.5) would be 2
        raise ValueError(f"{flag}: got {value!r}, expected {accepted}")
    return number


def label_command(experiment: str, output: str, *, count, judge: str, temperature=0.0,
                  label_type: Optional[str] = None, seed=0, **overrides):
    """`./launch.py label EXPERIMENT OUTPUT.json --count N --judge NAME [--temperature T] [--label_type TYPE]
    [--seed S] [--some.hparam VALUE ...]`: write `count` label records in the released format.

    EXPERIMENT is a `train_reward` experiment (overrides apply as for `train_reward`); its task gives the
    queries (train split) and its initial policy, sampled at the task's temperature, the responses,
    post-processed as for scoring. `judge` plays the human (see JUDGES); `temperature` is its noise (module
    docstring); `label_type` defaults to the experiment's `labels.type`; `seed` fixes queries, samples and
    noise. The file is written atomically to the local path `output`."""
    from lm_human_preferences import label_types, launcher, lm_tasks

    count = _parse_number(count, int, "--count", "a positive number of labels", 1)
    temperature = _parse_number(temperature, float, "--temperature", "a judge noise >= 0 (0 = exact)", 0.0)
    seed = _parse_number(seed, int, "--seed", "an integer >= 0", 0)
    if not output or files.is_remote(str(output)):
        raise ValueError(f"label output {output!r}: expected a local file path (write locally, then upload)")
    judge_fn = get_judge(judge)  # fail before any model is built
    hparams = launcher.resolve_hparams("train_reward", experiment, "label", overrides=overrides)
    label_type = label_types.get(label_type or hparams.labels.type)
    task = hparams.task

    import tensorflow.compat.v1 as tf
    from lm_human_preferences.language.trained_models import TrainedModel
    from lm_human_preferences.policy import Policy
    from lm_human_preferences.utils import devices

    trained_model = TrainedModel(task.policy.initial_model)
    encoding = trained_model.encoding
    encoder = encoding.get_encoder()
    batch_size = min(count, hparams.rollout_batch_size)
    with tf.Graph().as_default():
        tf.set_random_seed(seed)
        # The labelers saw samples of the initial policy: the reference policy of a later PPO run.
        policy = Policy(trained_model, scope="ref_policy", temperature=task.policy.temperature,
                        embed_queries=lm_tasks.query_formatter(task, encoder))
        queries = tf.placeholder(tf.int32, [None, task.query_length], name="queries")
        responses = policy.respond_op(queries, task.response_length)["responses"]  # [b, response_length]
        with devices.new_session() as sess:
            sess.run(tf.global_variables_initializer())

            def sample(query_batch):  # [b, query_length] -> [b, response_length]
                raw = sess.run(responses, {queries: query_batch})
                return lm_tasks.postprocess_responses(raw, task, encoding.padding_token)

            query_batches = lm_tasks.query_batches(task, encoder, batch_size, mode="train", seed=seed, rank=0,
                                                   size=1)
            records = label_samples(sample, query_batches, label_type, judge_fn, encoder, count, temperature,
                                    np.random.RandomState(seed))
    write_label_file(output, records)
    print(f"wrote {count} {label_type.name} labels of experiment {experiment!r} by judge {judge!r} "
          f"(temperature {temperature}) to {output}")
