"""A synthetic labeler for the offline demo: a programmatic judge with a known preference plays the human.

A judge maps a response's text to a score. `make_records` turns queries and policy samples into label records
in exactly the released JSON format (best_of_N, scalar_rating, scalar_compare); with a temperature > 0 the
judge chooses like a noisy human, by a softmax over its scores. `./launch.py label` writes such a file.
"""

import json
import re
from typing import Callable, Dict, List, Sequence

import numpy as np

from lm_human_preferences.utils import files

Judge = Callable[[str, str], float]  # (query text, response text) -> score


def letter_density(letter: str) -> Judge:
    """Prefers responses in which `letter` is frequent: the fraction of the response's characters that are it."""
    def judge(query: str, response: str) -> float:
        return response.count(letter) / len(response) if response else 0.0
    judge.__name__ = f"letter_{letter}"
    return judge


def vowel_density(query: str, response: str) -> float:
    """Prefers responses rich in vowels (a, e, i, o, u)."""
    return sum(response.count(v) for v in "aeiou") / len(response) if response else 0.0


JUDGES: Dict[str, str] = {
    "letter_X": "fraction of the response's characters that are the letter X (e.g. letter_e)",
    "vowels": "fraction of the response's characters that are vowels",
}


def get_judge(name: str) -> Judge:
    match = re.fullmatch(r"letter_(\w)", name or "")
    if match:
        return letter_density(match.group(1))
    if name == "vowels":
        return vowel_density
    raise ValueError(f"unknown judge {name!r}; known judges: "
                     + "; ".join(f"{judge} ({what})" for judge, what in JUDGES.items()))


def judge_scores(judge: Judge, encoder, queries: np.ndarray, responses: np.ndarray) -> np.ndarray:
    """The judge's scores of decoded responses [b] (padding decodes to nothing)."""
    return np.array([judge(encoder.decode(q), encoder.decode(r)) for q, r in zip(queries, responses)], np.float64)


def choose(scores: np.ndarray, temperature: float, rng: np.random.RandomState) -> int:
    """The judge's pick among samples: the best (ties at random) at temperature 0, else a softmax draw."""
    scores = np.asarray(scores, np.float64)
    if temperature == 0:
        return int(rng.choice(np.flatnonzero(scores == scores.max())))
    logits = (scores - scores.max()) / temperature
    probabilities = np.exp(logits) / np.exp(logits).sum()
    return int(rng.choice(len(scores), p=probabilities))


def make_records(label_type, queries: np.ndarray, samples: Sequence[np.ndarray], judge: Judge, encoder,
                 temperature: float, rng: np.random.RandomState) -> List[dict]:
    """Label records in the released format. queries [b, query_length]; samples: label_type.num_samples arrays
    [b, response_length] (sample i of every query)."""
    if len(samples) != label_type.num_samples:
        raise ValueError(f"{label_type.name} needs {label_type.num_samples} samples per query, got {len(samples)}")
    scores = np.stack([judge_scores(judge, encoder, queries, s) for s in samples], axis=1)  # [b, num_samples]
    noise = (lambda: rng.gumbel() * temperature) if temperature > 0 else (lambda: 0.0)
    records = []
    for i, query in enumerate(queries):
        record = {"query": [int(t) for t in query]}
        fields = label_type.sample_fields()
        for field, sample in zip(fields, samples):
            record[field] = [int(t) for t in sample[i]]
        answer, kind = next(iter(label_type.label_fields().items()))
        if kind == "index":
            record[answer] = choose(scores[i], temperature, rng)
        elif label_type.num_samples == 1:
            record[answer] = float(scores[i, 0] + noise())
        else:
            record[answer] = float(scores[i, 1] - scores[i, 0] + noise())
        records.append(record)
    return records


def write_label_file(path: str, records: List[dict]):
    """Write records as a JSON list, atomically (a reader never sees half a file)."""
    files.write_text_atomic(path, json.dumps(records) + "\n")
