"""Query datasets: the texts queries are cut from, for a mode (`train` or `test`).

`get(name)` returns a function `(mode, *, source=None, seed=0, collective=True, shuffle=True)`. Finite
datasets (books, tldr, cnndm) return a random-access sequence of texts in the order the 2019 code read them:
shuffled once with Python's `random.seed(0); random.shuffle` whatever the run's seed (`seed` is unused), or
in file order with `shuffle=False`. tldr and cnndm texts are read and cleaned only when used. `test` returns
an endless iterator of random strings that depends on `seed` and `mode`.

`source` (`--task.query_source`) overrides where files are read from: a local path or a URL, so that datasets
whose 2019 storage is gone (books) can point at a substitute, and every reader is testable offline. Remote
files are fetched once per machine when `collective` (every MPI rank reads the dataset, see
`files.local_path`); pass False from code that only one rank runs.
"""

import hashlib
import json
import os
import random
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

from lm_human_preferences.utils import files, stats

BASE_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences"
BOOKS_URL = f"{BASE_URL}/datasets/book_passages"
TLDR_URL = f"{BASE_URL}/tldr"
CNNDM_URL_LISTS = f"{BASE_URL}/datasets/cnndm/url_lists"

Texts = Union[Sequence[str], Iterator[str]]
# The 2019 code shuffled every finite dataset with random.seed(0): its query sampler never passed the run's seed.
SHUFFLE_SEED = 0


def order_of_2019(items: Sequence, shuffle: bool = True) -> list:
    """`items` as a new list, shuffled as 2019's `random.seed(0); random.shuffle(items)` did. A private
    generator gives the same permutation (it depends only on the length) and leaves the global one alone."""
    items = list(items)
    if shuffle:
        random.Random(SHUFFLE_SEED).shuffle(items)
    return items


class LazyTexts(Sequence):
    """A sequence whose i-th text is `make_text(items[i])`, made only when it is read."""

    def __init__(self, items: Sequence, make_text: Callable[..., str]):
        self.items = items
        self.make_text = make_text

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyTexts(self.items[index], self.make_text)
        return self.make_text(self.items[index])


def _split_name(dataset: str, mode: str, splits: Dict[str, str]) -> str:
    """The file split a mode reads (e.g. tldr's test mode reads `valid`)."""
    if mode not in splits:
        raise ValueError(f"dataset {dataset}: unknown mode {mode!r}; accepted: {', '.join(splits)}")
    return splits[mode]


def _read(path: str, dataset: str, hint: str, collective: bool) -> str:
    try:
        return files.read_text(path, collective=collective)
    except OSError as error:  # FileFetchError is an OSError too
        raise ValueError(f"dataset {dataset}: cannot read {path}: {error}. {hint}") from error


def _is_local_dir(path: str) -> bool:
    return not files.is_remote(path) and os.path.isdir(os.path.expanduser(path))


# ----- books -----------------------------------------------------------------------------------------------

BOOKS_SOURCES = ("a directory (local or URL) holding train.jsonl and test.jsonl, one .jsonl file (a JSON string "
                 "or an object with a \"text\" string per line) or a plain .txt book (split into passages at "
                 "blank lines)")
BOOKS_GONE_HINT = ("The 2019 book passages are no longer served (404 since 2019); set --task.query_source to a "
                   f"substitute: {BOOKS_SOURCES}.")
BOOKS_SOURCE_HINT = f"--task.query_source accepts {BOOKS_SOURCES}."


def split_passages(text: str, min_chars: int = 400, max_chars: int = 2000) -> List[str]:
    """A plain-text book as passages: blank-line separated paragraphs with their line breaks joined; short
    consecutive paragraphs (dialogue, headings) are joined until a passage holds `min_chars` (so that a query
    of 64 tokens after the first "." can fill), never beyond `max_chars`; longer paragraphs are cut at
    sentence ends."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    pieces = []
    for paragraph in filter(None, paragraphs):
        while len(paragraph) > max_chars:
            cut = paragraph.rfind(". ", 0, max_chars) + 1 or max_chars  # no sentence end: a hard cut
            pieces.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if paragraph:
            pieces.append(paragraph)
    passages, current = [], ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > max_chars:
            passages.append(current)
            current = ""
        current = f"{current} {piece}" if current else piece
        if len(current) >= min_chars:
            passages.append(current)
            current = ""
    if current:
        passages.append(current)
    return passages


def _jsonl_texts(text: str, path: str) -> List[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error.msg}); {BOOKS_SOURCE_HINT}") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise ValueError(f"{path}, line {number}: expected a JSON string or an object with a \"text\" "
                             f"string, got {type(item).__name__}")
        texts.append(item)
    return texts


def _books_path(source: str, mode: str) -> str:
    """A file source serves both modes; a directory (local, or a URL that does not name a file) holds one
    file per mode."""
    if _is_local_dir(source):
        return os.path.join(os.path.expanduser(source), f"{mode}.jsonl")
    if files.is_remote(source) and not source.endswith((".jsonl", ".json", ".txt")):
        return files.join(source, f"{mode}.jsonl")
    return source


def books(mode: str, *, source: Optional[str] = None, seed: int = 0, collective: bool = True,
          shuffle: bool = True) -> List[str]:
    """Book passages, in the 2019 order: `{mode}.jsonl` of the 2019 release, or a substitute from `source`."""
    _split_name("books", mode, {"train": "train", "test": "test"})
    path = f"{BOOKS_URL}/{mode}.jsonl" if source is None else _books_path(source, mode)
    text = _read(path, "books", BOOKS_GONE_HINT if source is None else BOOKS_SOURCE_HINT, collective)
    passages = split_passages(text) if path.endswith(".txt") else _jsonl_texts(text, path)
    if not passages:
        raise ValueError(f"dataset books: {path} holds no passages; {BOOKS_SOURCE_HINT}")
    return order_of_2019(passages, shuffle)


# ----- tldr ------------------------------------------------------------------------------------------------

def clean_tldr(text: str) -> str:
    """ftfy-fixed text with runs of 3+ newlines made 2, stripped (the 2019 cleaning)."""
    import ftfy
    return re.sub(r"\n{3,}", "\n\n", ftfy.fix_text(text)).strip()


def tldr(mode: str, *, source: Optional[str] = None, seed: int = 0, collective: bool = True,
         shuffle: bool = True) -> Sequence[str]:
    """Reddit posts from `{train,valid}-subset.json`, in the 2019 order; test mode reads `valid` (there is no
    test split)."""
    split = _split_name("tldr", mode, {"train": "train", "test": "valid", "valid": "valid"})
    base = TLDR_URL if source is None else source
    path = base if base.endswith(".json") else files.join(base, f"{split}-subset.json")
    hint = "Set --task.query_source to a directory (local or URL) holding train-subset.json and valid-subset.json."
    try:
        items = json.loads(_read(path, "tldr", hint, collective))
    except json.JSONDecodeError as error:
        raise ValueError(f"dataset tldr: {path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(items, list):
        raise ValueError(f"dataset tldr: {path} should hold a JSON list of {{\"content\": ...}} objects, "
                         f"got {type(items).__name__}")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise ValueError(f"dataset tldr: {path}, item {index} has no \"content\" string")
    contents = order_of_2019([item["content"] for item in items], shuffle)
    return LazyTexts(contents, clean_tldr)  # ftfy is slow: clean on use


# ----- cnndm -----------------------------------------------------------------------------------------------

SITES = ("cnn", "dailymail")
CNN_DASH_OPENER = re.compile(r"\(CNN\) +--")  # "WASHINGTON (CNN) -- ..."
CNN_OPENER = re.compile(r"\(CNN\)")  # "ATLANTA, Georgia (CNN)The storm ..."
CNN_OPENER_CHARS = 100  # only a "(CNN)" this near the start is an opener
CO_AUTHOR_LINE = re.compile(r"^and \w+\n")  # what a two-line "By" byline may leave: "and Name"
# Daily Mail headers such as "UPDATED:\n\n15:36 EST, 25 October 2013". The brackets are the 2019 regex's: a
# character class (any of "0-5", "|"), not the list of years it looks like; kept as is, so that the same
# text is cut: up to the last such character on the line of the last "UPDATED: hh:mm".
UPDATED_HEADER = re.compile(r".*UPDATED:\s+[0-9]{2}:[0-9]{2}.*[2011|2012|2013|2014|2015]")


def story_name(url: str) -> str:
    """CNN/DailyMail story files are named by the SHA1 of their URL."""
    return hashlib.sha1(url.strip().encode("utf-8")).hexdigest() + ".story"


def _after_last(pattern: re.Pattern, text: str) -> str:
    """The text after the last match of `pattern` (all of it without a match)."""
    end = 0
    for match in pattern.finditer(text):
        end = match.end()
    return text[end:]


def clean_story(text: str) -> str:
    """A raw .story file's article, by the 2019 rules in their order: drop the first two lines of a text
    starting with "By" (a byline); keep what follows the last "(CNN) --", then what follows the last "(CNN)"
    within the first 100 characters; drop a leading "and Name" line; keep what follows the last Daily Mail
    "UPDATED: hh:mm" header; straighten curly single quotes; ftfy; runs of 3+ newlines become 2; the text
    before the first @highlight (the summary bullets), stripped."""
    import ftfy
    if text[:2] == "By":  # 2019 compared the first two characters: "Byron ..." loses two lines too
        text = "\n".join(text.split("\n")[2:])
    text = _after_last(CNN_DASH_OPENER, text)
    text = _after_last(CNN_OPENER, text[:CNN_OPENER_CHARS]) + text[CNN_OPENER_CHARS:]
    text = CO_AUTHOR_LINE.sub("", text, count=1)
    text = _after_last(UPDATED_HEADER, text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").strip()
    text = re.sub(r"\n{3,}", "\n\n", ftfy.fix_text(text))
    return text.split("@highlight")[0].strip()


def _story_files(stories_dir: str) -> Dict[str, str]:
    """{story file name: path} for both sites; listed once, as checking 300k paths one by one is slow."""
    found = {}
    for site in SITES:
        directory = os.path.join(stories_dir, site, "stories")
        if os.path.isdir(directory):
            found.update({name: os.path.join(directory, name) for name in os.listdir(directory)})
    return found


def _read_story(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return clean_story(f.read())


def cnndm(mode: str, *, source: Optional[str] = None, seed: int = 0, collective: bool = True,
          shuffle: bool = True) -> Sequence[str]:
    """CNN/DailyMail articles of the 2019 URL list of the split, from a local directory of stories, in the
    2019 order: the whole URL list shuffled, then the stories missing from the directory dropped (and
    reported once), keeping the order of the rest."""
    split = _split_name("cnndm", mode, {"train": "train", "test": "test", "valid": "val"})
    layout = "cnn/stories/<sha1 of url>.story and dailymail/stories/<sha1 of url>.story"
    if source is None or not _is_local_dir(source):
        raise ValueError(f"dataset cnndm: set --task.query_source to a local directory of CNN/DailyMail stories "
                         f"({layout}); they cannot be downloaded here (got {source!r})")
    source = os.path.expanduser(source)
    list_name = f"all_{split}.txt"
    local_lists = [os.path.join(source, list_name), os.path.join(source, "url_lists", list_name)]
    url_list = next((p for p in local_lists if os.path.isfile(p)), f"{CNNDM_URL_LISTS}/{list_name}")
    url_text = _read(url_list, "cnndm", f"Put {list_name} in {source}.", collective)
    urls = order_of_2019([url.strip() for url in url_text.splitlines() if url.strip()], shuffle)
    stories = _story_files(source)
    paths = [stories[name] for name in map(story_name, urls) if name in stories]
    if not paths:
        raise ValueError(f"dataset cnndm: none of the {len(urls)} stories of {url_list} is in {source} "
                         f"(expected {layout})")
    if len(paths) < len(urls):  # 2019 had every story; a partial copy is usable, but say so (on rank 0)
        stats.log(f"dataset cnndm: {len(urls) - len(paths)} of {len(urls)} stories of {list_name} are missing "
                  f"from {source}; they are skipped")
    return LazyTexts(paths, _read_story)


# ----- test ------------------------------------------------------------------------------------------------

TEST_ALPHABET = "abcdefghijklmnopqrstuvwxyz."


def test(mode: str, *, source: Optional[str] = None, seed: int = 0, collective: bool = True,
         shuffle: bool = True) -> Iterator[str]:
    """Endless random strings of 40 characters of the test alphabet, a different stream per mode and seed
    (2019's used the unseeded global generator; tests and the demo need distinct, reproducible streams)."""
    _split_name("test", mode, {"train": "train", "test": "test"})
    rng = random.Random(f"{seed}-{mode}")
    while True:
        yield "".join(rng.choice(TEST_ALPHABET) for _ in range(40))


DATASETS: Dict[str, Callable[..., Texts]] = {"books": books, "tldr": tldr, "cnndm": cnndm, "test": test}


def get(name: str) -> Callable[..., Texts]:
    if name not in DATASETS:
        raise ValueError(f"unknown query dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]
