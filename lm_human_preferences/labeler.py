"""A synthetic labeler for the offline demo: a programmatic judge with a known preference plays the human.

A judge maps (query text, response text) to a score. `make_records` turns queries and policy samples into
label records in exactly the released JSON format:

* best_of_N:      {"query": [...], "sample0": [...], ..., "sample{N-1}": [...], "best": int}
* scalar_rating:  {"query": [...], "sample": [...], "score": float}
* scalar_compare: {"query": [...], "sample0": [...], "sample1": [...], "difference": float}  # judge(s1) − judge(s0)

`temperature` is the judge's noise, in judge-score units, which each label type applies to the judge's scores
(`LabelType.judge_label`): a best_of_N choice is drawn from a softmax over the scores at that temperature (0:
always the best, ties broken at random), as a human who sometimes picks a worse sample; scalar labels get
Gaussian noise with that standard deviation (0: exact).

`label_samples` runs the labelling loop over any sampler; `label_command` (`./launch.py label`) samples an
experiment's initial policy (or a saved policy) and writes a label file. With `--judge human` people label
instead, in the web app of label_app.py. TensorFlow is imported only to sample (`sample_policy_records`).
"""

import json
import math
import os
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lm_human_preferences import label_types
from lm_human_preferences.command_line import number
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


def _label_type(label_type) -> label_types.LabelType:
    """A label type, given as itself or by its name."""
    if not isinstance(label_type, str):
        return label_type
    try:
        return label_types.get(label_type)
    except ValueError:
        raise ValueError(f"the labeler cannot make {label_type!r} labels; accepted label types: "
                         f"{label_types.ACCEPTED}") from None


def _tokens(row) -> List[int]:
    return [int(token) for token in row]  # numpy ints are not JSON; the released files hold plain ints


def make_records(label_type, queries: np.ndarray, samples: Sequence[np.ndarray], judge: Judge, encoder,
                 temperature: float, rng: np.random.RandomState) -> List[dict]:
    """Label records in the released format, one per query.

    label_type: a `label_types.LabelType` or its name; queries: [b, query_length] token ids;
    samples: the label type's number of samples per record, each [b, response_length] (sample i of every
    query), e.g. 4 arrays for best_of_4; judge: see `get_judge`; encoder: decodes tokens for the judge;
    temperature: the judge's noise (module docstring); rng: all randomness (ties, choices, noise)."""
    label_type = _label_type(label_type)
    if temperature < 0:
        raise ValueError(f"the judge's temperature must be >= 0 (0 = no noise), got {temperature}")
    queries = np.asarray(queries)
    samples = [np.asarray(sample) for sample in samples]
    if len(samples) != label_type.num_samples:
        raise ValueError(f"{label_type.family} records need {label_type.num_samples} samples per query, got "
                         f"{len(samples)}")
    for index, sample in enumerate(samples):
        if sample.ndim != 2 or sample.shape[0] != queries.shape[0]:
            raise ValueError(f"sample {index} must be [batch={queries.shape[0]}, response_length] token ids, "
                             f"got shape {sample.shape}")
    scores = np.stack([judge_scores(judge, encoder, queries, sample) for sample in samples], axis=1)  # [b, N]

    records = unlabelled_records(label_type, queries, samples)
    for record, record_scores in zip(records, scores):
        record.update(label_type.judge_label(record_scores, temperature, rng))
    return records


def unlabelled_records(label_type, queries: np.ndarray, samples: Sequence[np.ndarray]) -> List[dict]:
    """Records in the released format without the label field (what people label in the web app): `query` and
    the label type's sample fields (`sample0..`, or `sample`) as plain int lists. queries [b, query_length];
    samples: the label type's number of [b, response_length] arrays."""
    names = _label_type(label_type).sample_fields()
    return [{"query": _tokens(query), **{name: _tokens(sample[i]) for name, sample in zip(names, samples)}}
            for i, query in enumerate(np.asarray(queries))]


def write_label_file(path: str, records: List[dict]):
    """Write records as a JSON list, atomically (temporary file + rename: a reader never sees half a file)."""
    files.write_text_atomic(path, json.dumps(records) + "\n")


# ----- labelling policy samples -----------------------------------------------------------------------------------

def label_samples(sample: Callable[[np.ndarray], np.ndarray], query_batches: Iterator[np.ndarray], label_type,
                  judge: Judge, encoder, count: int, temperature: float, rng: np.random.RandomState) -> List[dict]:
    """`count` records: for each batch of queries [b, query_length], the label type's number of samples drawn
    with `sample(queries) -> [b, response_length]` (already post-processed, as the labelers saw them), judged."""
    return _sampled_records(sample, query_batches, label_type, count, lambda queries, samples: make_records(
        label_type, queries, samples, judge, encoder, temperature, rng))


def _sampled_records(sample, query_batches, label_type, count: int, make) -> List[dict]:
    """`count` records made by `make(queries, samples)` from batches of queries and the label type's number of
    samples of each."""
    records = []
    while len(records) < count:
        queries = next(query_batches)  # [b, query_length]
        samples = [sample(queries) for _ in range(_label_type(label_type).num_samples)]  # each [b, response_length]
        records.extend(make(queries, samples))
    return records[:count]


HUMAN = "human"  # the judge that is people, labelling in the web app (label_app.py)
_SERVING_FLAGS = ("host", "port", "token", "overlap", "instructions")  # --judge human only


def label_command(experiment: str, output: str, *, count, judge: str, temperature=None,
                  label_type: Optional[str] = None, seed=0, policy: Optional[str] = None, host=None, port=None,
                  token=None, overlap=None, instructions=None, **overrides):
    """`./launch.py label EXPERIMENT OUTPUT.json --count N --judge NAME [--temperature T] [--label_type TYPE]
    [--seed S] [--policy SAVE_DIR] [--some.hparam VALUE ...]`: write `count` label records in the released format.

    EXPERIMENT is a `train_reward` experiment (overrides apply as for `train_reward`); its task gives the
    queries (train split) and its initial policy, sampled at the task's temperature, the responses,
    post-processed as for scoring; `policy` samples a saved policy instead (a train_policy run directory, or its
    `policy` directory). `judge` plays the human (see JUDGES); `temperature` is its noise (module docstring);
    `label_type` defaults to the experiment's `labels.type`; `seed` fixes queries, samples and noise. The file
    is written atomically to the local path `output`.

    `--judge human`: people label the samples in a web page (label_app.py) served on host:port (default
    127.0.0.1:8000; another address needs `token`, generated when not given), `overlap` of the items by two of
    them; `instructions` is a text file replacing the experiment's instructions. The samples and every answer
    are kept next to `output`, so the same command again resumes where it stopped, without sampling again."""
    from lm_human_preferences import experiments

    count = number(count, int, "--count", "a positive number of labels", 1)
    seed = number(seed, int, "--seed", "an integer >= 0", 0)
    if not output or files.is_remote(str(output)):
        raise ValueError(f"label output {output!r}: expected a local file path (write locally, then upload)")
    serving = {"host": host, "port": port, "token": token, "overlap": overlap, "instructions": instructions}
    if judge == HUMAN:
        if temperature is not None:
            raise ValueError("--temperature is a synthetic judge's noise; people (--judge human) need none")
        return _label_by_people(experiment, output, count=count, label_type=label_type, seed=seed, policy=policy,
                                overrides=overrides, **serving)
    for flag in _SERVING_FLAGS:
        if serving[flag] is not None:
            raise ValueError(f"--{flag} applies only to --judge human (people labelling in the web app)")
    if os.path.lexists(os.path.expanduser(output)):
        raise ValueError(_exists_message(output))
    temperature = number(0.0 if temperature is None else temperature, float, "--temperature",
                         "a judge noise >= 0 (0 = exact)", 0.0)
    try:
        judge_fn = get_judge(judge)  # fail before any model is built
    except ValueError as error:
        raise ValueError(f"{error}; or {HUMAN}: people label in a web page") from None
    hparams = experiments.resolve_hparams("train_reward", experiment, "label", overrides=overrides)
    label_type = label_types.get(label_type or hparams.labels.type)

    rng = np.random.RandomState(seed)  # one stream for ties, choices and noise, batch after batch

    def judged(queries, samples, encoder):
        return make_records(label_type, queries, samples, judge_fn, encoder, temperature, rng)

    records, _ = sample_policy_records(hparams, label_type, count, seed, policy, judged)
    try:
        files.write_new_text_atomic(output, json.dumps(records) + "\n")
    except FileExistsError:  # made by someone else while the judge was labelling
        raise ValueError(_exists_message(output)) from None
    source = f"policy {policy}" if policy else "the initial policy"
    print(f"wrote {count} {label_type.name} labels of experiment {experiment!r} ({source}) by judge {judge!r} "
          f"(temperature {temperature}) to {output}")


def _exists_message(output) -> str:
    return (f"label output {output}: the file exists, and a label file is never overwritten; give another path "
            f"or remove it")


def _label_by_people(experiment, output, *, count, label_type, seed, policy, overrides, host, port, token, overlap,
                     instructions):
    """`label_command` with `--judge human`: sample the items (unless a stopped run of this very command left
    them next to OUTPUT), then serve them in the web app until they are all labelled."""
    from lm_human_preferences import experiments, label_app

    options = label_app.serving_options(host="127.0.0.1" if host is None else host,
                                        port=8000 if port is None else port, token=token,
                                        overlap=0.0 if overlap is None else overlap)
    text = label_app.default_instructions(experiment) if instructions is None else \
        label_app.read_instructions(instructions)
    paths = label_app.label_files(output)
    made_by = {"command": "label", "experiment": experiment, "count": count, "label_type": label_type,
               "seed": seed, "policy": policy, "overrides": {name: str(value) for name, value in overrides.items()}}
    label_set = label_app.load_label_set(paths.items)
    if label_set is not None and label_set.made_by != made_by:
        recorded = label_set.made_by or {}
        changed = ", ".join(f"{name} {recorded.get(name)!r} -> {made_by[name]!r}" for name in made_by
                            if recorded.get(name) != made_by[name])
        raise ValueError(f"{paths.items} holds the items of a different labeling command ({changed}); repeat that "
                         f"command to resume it, or label into another OUTPUT")
    if label_set is not None and not math.isclose(label_set.overlap, options.overlap):
        raise ValueError(f"this labeling job ({paths.items}) was started with --overlap {label_set.overlap}; "
                         f"resume it with the same --overlap")
    label_app.check_can_bind(options)
    if label_set is None:  # a new job: sample the items (the only part that needs TensorFlow)
        label_app.check_new_job(paths)
        hparams = experiments.resolve_hparams("train_reward", experiment, "label", overrides=overrides)
        resolved_type = label_types.get(label_type or hparams.labels.type)
        items, encoder = sample_policy_records(hparams, resolved_type, count, seed, policy,
                                               lambda queries, samples, _: unlabelled_records(resolved_type, queries,
                                                                                              samples))
        label_set = label_app.prepare_label_set(paths, items, resolved_type, options.overlap, encoder, made_by)

    try:
        label_app.serve_label_set(label_set, paths, options, text)  # Ctrl-C or `kill`: the labels so far exported
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the app has said what it wrote and how to resume


def saved_policy_model(save_dir: str):
    """The TrainedModel of a saved policy: a train_policy run directory (its `policy/`) or that `policy/`
    directory itself (local, https:// or gs://)."""
    from lm_human_preferences.language.trained_models import TrainedModel
    for directory in (files.join(save_dir, "policy"), save_dir):
        if files.exists(files.join(directory, "hparams.json")):
            return TrainedModel("policy", savedir=directory)
    raise ValueError(f"--policy {save_dir}: no saved policy there (expected a train_policy run directory holding "
                     f"policy/hparams.json and policy/checkpoints/, or such a policy directory)")


def sample_policy_records(hparams, label_type, count: int, seed: int, policy: Optional[str], make):
    """(`count` records made by `make(queries, samples, encoder)` from samples of the experiment's initial policy,
    or of the saved policy at `policy`, post-processed as for scoring; the encoder)."""
    from lm_human_preferences.utils import devices
    tf = devices.import_tensorflow().compat.v1  # first, without TensorFlow's start-up notices

    from lm_human_preferences import lm_tasks
    from lm_human_preferences.language.trained_models import TrainedModel
    from lm_human_preferences.policy import sampler

    task = hparams.task
    trained_model = TrainedModel(task.policy.initial_model)
    if policy:
        saved = saved_policy_model(policy)
        if saved.encoding.name != trained_model.encoding.name:
            raise ValueError(f"--policy {policy}: it uses the {saved.encoding.name!r} encoding, but the "
                             f"experiment's task uses {trained_model.encoding.name!r}; pick the experiment it was "
                             f"trained on")
        trained_model = saved
    encoding = trained_model.encoding
    encoder = encoding.get_encoder()
    batch_size = min(count, hparams.rollout_batch_size)
    with tf.Graph().as_default():
        tf.set_random_seed(seed)
        # The labelers saw samples of the initial policy, the reference policy of a later PPO run (or, online, of
        # the policy being trained).
        _, queries, _, sampled = sampler(trained_model, task, encoder, scope="policy" if policy else "ref_policy")
        with devices.new_session() as sess:
            sess.run(tf.global_variables_initializer())

            def sample(query_batch):  # [b, query_length] -> [b, response_length]
                raw = sess.run(sampled["responses"], {queries: query_batch})  # [b, response_length]
                return lm_tasks.postprocess_responses(raw, task, encoding.padding_token)

            query_batches = lm_tasks.query_batches(task, encoder, batch_size, mode="train", seed=seed, rank=0,
                                                   size=1)
            records = _sampled_records(sample, query_batches, label_type, count,
                                       lambda queries_batch, samples: make(queries_batch, samples, encoder))
    return records, encoder
