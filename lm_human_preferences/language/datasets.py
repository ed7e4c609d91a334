"""Query datasets (SPEC section 6): each yields text for a mode (`train` or `test`).

`get(name)` returns a function `(mode, *, source=None, seed=0) -> iterator of str`. `source` overrides where the
files are read from (`--task.query_source`): a local path or a URL, so that datasets whose 2019 storage is gone
(books) can point at a substitute and every reader is testable offline.
"""

import hashlib
import json
import os
import random
import re
from typing import Callable, Dict, Iterator, List, Optional

from lm_human_preferences.utils import files

BASE_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences"
BOOKS_URL = f"{BASE_URL}/datasets/book_passages"
TLDR_URL = f"{BASE_URL}/tldr"
CNNDM_URL_LISTS = f"{BASE_URL}/datasets/cnndm/url_lists"

MODES = ("train", "test")


def _check_mode(mode: str, dataset: str):
    if mode not in MODES:
        raise ValueError(f"dataset {dataset}: unknown mode {mode!r}; accepted: {', '.join(MODES)}")


def _read(path: str, dataset: str, hint: str) -> str:
    try:
        return files.read_text(path)
    except (OSError, files.FileFetchError) as error:
        raise ValueError(f"dataset {dataset}: cannot read {path}: {error}. {hint}") from error


# ----- books -----------------------------------------------------------------------------------------------------

BOOKS_HINT = ("The 2019 book passages are no longer served; set --task.query_source to a substitute: a directory "
              "with train.jsonl/test.jsonl, one .jsonl file (a JSON string or {\"text\": ...} per line), or a "
              "plain .txt book (split into passages at blank lines).")


def split_passages(text: str, max_chars: int = 2000) -> List[str]:
    """A plain-text book as passages: blank-line separated paragraphs, long ones cut at sentence ends."""
    passages = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        while len(paragraph) > max_chars:
            cut = paragraph.rfind(". ", 0, max_chars) + 1 or max_chars
            passages.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if paragraph:
            passages.append(paragraph)
    return passages


def _jsonl_texts(text: str, path: str) -> List[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise ValueError(f"{path}, line {number}: expected a JSON string or an object with a \"text\" "
                             f"string, got {type(item).__name__}")
        texts.append(item)
    return texts


def books(mode: str, *, source: Optional[str] = None, seed: int = 0) -> Iterator[str]:
    _check_mode(mode, "books")
    if source is None:
        path = f"{BOOKS_URL}/{mode}.jsonl"
    elif not files.is_remote(source) and os.path.isdir(source):
        path = os.path.join(source, f"{mode}.jsonl")
    else:
        path = source
    text = _read(path, "books", BOOKS_HINT)
    yield from (split_passages(text) if path.endswith(".txt") else _jsonl_texts(text, path))


# ----- tldr ------------------------------------------------------------------------------------------------------

def clean_tldr(text: str) -> str:
    import ftfy
    return re.sub(r"\n{3,}", "\n\n", ftfy.fix_text(text)).strip()


def tldr(mode: str, *, source: Optional[str] = None, seed: int = 0) -> Iterator[str]:
    _check_mode(mode, "tldr")
    split = "train" if mode == "train" else "valid"
    path = files.join(source or TLDR_URL, f"{split}-subset.json")
    items = json.loads(_read(path, "tldr", "Set --task.query_source to a directory holding "
                                           "train-subset.json and valid-subset.json."))
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise ValueError(f"{path}: item {index} has no \"content\" string")
        yield clean_tldr(item["content"])


# ----- cnndm -----------------------------------------------------------------------------------------------------

def story_path(stories_dir: str, url: str) -> Optional[str]:
    """CNN/DailyMail stories are named by the SHA1 of their URL, under cnn/stories or dailymail/stories."""
    name = hashlib.sha1(url.strip().encode("utf-8")).hexdigest() + ".story"
    for site in ("cnn", "dailymail"):
        path = os.path.join(stories_dir, site, "stories", name)
        if os.path.exists(path):
            return path
    return None


def clean_story(text: str) -> str:
    """The article before the first @highlight, without bylines and "(CNN) --" openers."""
    article = text.split("@highlight")[0]
    lines = [line.strip() for line in article.splitlines() if line.strip()]
    lines = [line for line in lines if not re.match(r"^(By \. |By\s+[A-Z].*\. (PUBLISHED|UPDATED)|"
                                                    r"Last updated at|PUBLISHED:|UPDATED:)", line)]
    article = "\n".join(lines)
    article = re.sub(r"^.{0,80}?\(CNN\)\s*(--)?\s*", "", article)
    return article.strip()


def cnndm(mode: str, *, source: Optional[str] = None, seed: int = 0) -> Iterator[str]:
    _check_mode(mode, "cnndm")
    if source is None or files.is_remote(source) or not os.path.isdir(source):
        raise ValueError("dataset cnndm: set --task.query_source to a local directory of CNN/DailyMail stories "
                         "(cnn/stories/*.story, dailymail/stories/*.story); they cannot be downloaded here")
    split = {"train": "train", "test": "test"}[mode]
    local_list = os.path.join(source, f"all_{split}.txt")
    url_list = local_list if os.path.exists(local_list) else f"{CNNDM_URL_LISTS}/all_{split}.txt"
    urls = [u for u in _read(url_list, "cnndm", "Put all_train.txt/all_test.txt next to the stories.").splitlines()
            if u.strip()]
    found = 0
    for url in urls:
        path = story_path(source, url)
        if path is not None:
            found += 1
            with open(path, encoding="utf-8") as f:
                yield clean_story(f.read())
    if not found:
        raise ValueError(f"dataset cnndm: none of the {len(urls)} stories of {url_list} is in {source}")


# ----- test ------------------------------------------------------------------------------------------------------

TEST_ALPHABET = "abcdefghijklmnopqrstuvwxyz."


def test(mode: str, *, source: Optional[str] = None, seed: int = 0) -> Iterator[str]:
    """Endless random strings of 40 characters of the test alphabet (a different stream per mode)."""
    _check_mode(mode, "test")
    rng = random.Random(f"{seed}-{mode}")
    while True:
        yield "".join(rng.choice(TEST_ALPHABET) for _ in range(40))


test.endless = True  # never runs out: the query pipeline shards it instead of shuffling a list

DATASETS: Dict[str, Callable[..., Iterator[str]]] = {"books": books, "tldr": tldr, "cnndm": cnndm, "test": test}


def get(name: str) -> Callable[..., Iterator[str]]:
    if name not in DATASETS:
        raise ValueError(f"unknown query dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]
