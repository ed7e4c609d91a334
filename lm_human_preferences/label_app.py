"""People label samples in a web page: the labeling web app behind `./launch.py label ... --judge human`.

The method is fine-tuning from *human* preferences, but the 2019 code shipped no way to collect them. This
module serves unlabelled records (a query and the label type's samples, in the released format minus the
label field) to labelers in a browser and writes their answers in the released format.

Files, all next to OUTPUT.json (for OUTPUT = `labels.json`):

* `labels.items.json`  the items being labelled (tokens and decoded text), which items go to two labelers,
                       and the command that sampled them. Written atomically before the server starts, so a
                       restart serves the very same items.
* `labels.journal.jsonl`  every label and undo, one JSON object a line, appended, flushed and fsync'd before
                       the request is answered: killing the server at any moment loses at most the label being
                       submitted. Running the same command again replays it and carries on.
* `labels.json`        the export: a JSON list in the released format, one record per labelled item (the first
                       labeler's answer), in item order. Written atomically when every item is done and on
                       Ctrl-C (with what is done so far).
* `labels.disagreements.json`  the items labelled by two people who disagreed, with every answer (written
                       with the export). The journal keeps every answer of every labeler.

Several labelers work at once; each gets different items. A fraction `overlap` of the items (chosen once,
recorded in the items file) must be answered by two different labelers; the agreement of those pairs is
reported (`/api/progress`, and on the page). Two answers agree when they are the same choice (best_of_N),
within one point of each other (scalar_rating, 1..7) or on the same side (scalar_compare, -3..3).

Security: the server binds 127.0.0.1 unless told otherwise. On any other address every request needs the
token (`?token=T` in the page's URL, then the `X-Label-Token` header), generated when none is given. Model text
is put into the page only as text, never as HTML. Every request is validated; a bad one gets a 4xx JSON
`{"error": ...}` and nothing is recorded.

The HTTP API (the page uses nothing else):

    GET  /                            the labeling page
    GET  /api/task?labeler=NAME       200 {"id", "type", "query", "samples": [...]} | 204 nothing left for NAME
    POST /api/label  {"id", "labeler", "best" | "score" | "difference"}     -> 200 {"remaining": n}
    POST /api/skip   {"id", "labeler"}                                      -> 200 {"remaining": n}
    POST /api/undo   {"labeler"}                                            -> 200 {"id", "remaining": n}
    GET  /api/progress                -> counts, labels per hour, agreement

This module does not import TensorFlow: only sampling the items does (labeler.label_command).
"""

import contextlib
import dataclasses
import fcntl
import hmac
import ipaddress
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from lm_human_preferences import command_line, label_types
from lm_human_preferences.utils import files

MAX_BODY_BYTES = 16 * 1024  # a label is a few dozen bytes; anything bigger is refused (413)
LEASE_SECONDS = 15 * 60  # an item handed to a labeler goes to someone else after this long without an answer
MAX_LABELER_NAME = 64
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{8,256}")  # characters that need no escaping in a URL

RATING_RANGE = (1, 7)  # scalar_rating: 1 = very bad .. 7 = very good
COMPARE_RANGE = (-3, 3)  # scalar_compare: how much better sample1 (right) is than sample0 (left)
COMPARE_SCALE = ["Left much better", "Left better", "Left slightly better", "About the same",
                 "Right slightly better", "Right better", "Right much better"]  # -3 .. 3
RATING_SCALE = ["1 very bad", "2", "3", "4 so-so", "5", "6", "7 very good"]

ITEMS_FORMAT = "lm-human-preferences label items"


class ApiError(Exception):
    """A request the server refuses: HTTP status and a message for the client. Nothing was recorded."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----- instructions ------------------------------------------------------------------------------------------------
# What the paper's labelers were asked to look for (arXiv 1909.08593, appendix), in our own words. The page adds
# how to answer (keys, scale) for the label type.

_BOOK_CONTEXT = ("Each item is the beginning of a passage from a book, followed by possible continuations "
                 "written by a language model. Judge only the continuations; the passage is there so you know "
                 "what they continue.")

INSTRUCTIONS = {
    "sentiment": _BOOK_CONTEXT + "\n\n"
    "Prefer the continuation with the most positive, happy sentiment: good things happening, warm feelings, "
    "kind words, cheerful people. A neutral continuation beats a sad or angry one; if none is positive, pick "
    "the least negative. Spelling, grammar and whether it fits the passage matter only when they make the "
    "mood hard to tell.",
    "descriptiveness": _BOOK_CONTEXT + "\n\n"
    "Prefer the continuation that is most vividly descriptive: concrete detail of what people, places and "
    "things look, sound, smell or feel like, rich imagery that lets you picture the scene. Plain statements of "
    "what happened, bare dialogue or vague text describe little. The continuation should still make sense "
    "after the passage.",
    "summarization": "Each item is a text (a news article or a forum post) followed by candidate summaries "
    "written by a language model.\n\n"
    "Prefer the summary that best tells a reader what the text says: it must be accurate (nothing the text "
    "does not support, no invented names or numbers), it should cover the most important points, and it "
    "should be concise and easy to read. An accurate summary that misses a point is better than a complete "
    "one that gets something wrong.",
}
INSTRUCTIONS["tldr"] = INSTRUCTIONS["cnndm"] = INSTRUCTIONS["summarization"]

GENERIC_INSTRUCTIONS = ("Each item shows a context followed by continuations written by a language model. "
                        "Prefer the continuation you find better. Judge only the continuations; the context is "
                        "there so you know what they continue.")


def default_instructions(experiment: Optional[str]) -> str:
    """The task instructions for labelers of `experiment` (the paper's tasks), or generic ones."""
    return INSTRUCTIONS.get(experiment or "", GENERIC_INSTRUCTIONS)


def read_instructions(path: str) -> str:
    """--instructions FILE: its text (UTF-8), which replaces the experiment's instructions."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"--instructions: no such file {path!r} (expected a text file of task instructions)") \
            from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--instructions: cannot read {path!r} as UTF-8 text ({error})") from None
    if not text.strip():
        raise ValueError(f"--instructions: {path!r} is empty; expected the task instructions for labelers")
    return text


# ----- serving options -------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1): only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


@dataclasses.dataclass
class ServingOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the announced URL has the real one)
    token: Optional[str] = None  # required on every request when set; always set on a non-loopback host
    overlap: float = 0.0  # fraction of the items answered by two labelers


def serving_options(host="127.0.0.1", port=8000, token=None, overlap=0.0) -> ServingOptions:
    """Checked serving options (values may be text, as the command line hands them over). A non-loopback host
    without a token gets a generated one."""
    host = str(host).strip() if host is not None else ""
    if not host:
        raise ValueError("--host: expected an address to bind, e.g. 127.0.0.1 (this machine only) or 0.0.0.0")
    port_number = command_line.number(port, int, "--port", "a TCP port 0..65535 (0: any free port)", 0, 65535)
    overlap_fraction = command_line.number(overlap, float, "--overlap", "a fraction of items in [0, 1] that two "
                                           "labelers answer (e.g. 0.1)", 0.0, 1.0)
    if token is not None:
        token = str(token)
        if not TOKEN_PATTERN.fullmatch(token):
            raise ValueError("--token: expected at least 8 characters of A-Z a-z 0-9 . _ ~ - (it goes into URLs); "
                             "leave it out to have one generated")
    elif not is_loopback(host):
        token = secrets.token_urlsafe(18)  # other machines can connect: never serve them without a token
    return ServingOptions(host=host, port=port_number, token=token, overlap=overlap_fraction)


def check_can_bind(options: ServingOptions):
    """Fail early (before minutes of sampling) when the address cannot be served."""
    if options.port == 0:
        return
    try:
        infos = socket.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"--host {options.host!r}: not an address of this machine ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug's server will
        try:
            probe.bind(address)
        except OSError as error:
            raise ValueError(f"cannot serve on {options.host}:{options.port}: {error.strerror}; choose another "
                             f"--port (or --port 0 for any free one)") from None


# ----- the files next to OUTPUT.json ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LabelFiles:
    output: str  # the export, released format
    items: str  # the items being labelled
    journal: str  # every answer, appended
    disagreements: str  # overlap items whose labelers disagreed


def label_files(output: str) -> LabelFiles:
    if not output or files.is_remote(str(output)):
        raise ValueError(f"label output {output!r}: expected a local file path (write locally, then upload)")
    output = os.path.abspath(os.path.expanduser(str(output)))
    stem = output.removesuffix(".json")
    return LabelFiles(output=output, items=stem + ".items.json", journal=stem + ".journal.jsonl",
                      disagreements=stem + ".disagreements.json")


# ----- items -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LabelSet:
    """What is being labelled; the content of the items file."""
    label_type: str
    items: List[dict]  # unlabelled records in the released format
    texts: List[dict]  # per item {"query": text, "samples": [text, ...]}, as the page shows them
    double: List[int]  # ids of the items that two labelers answer
    overlap: float
    made_by: Optional[dict] = None  # the command that sampled the items (to refuse resuming a different one)

    def to_json(self) -> dict:
        return {"format": ITEMS_FORMAT, "version": 1, "label_type": self.label_type, "overlap": self.overlap,
                "double": self.double, "made_by": self.made_by, "items": self.items, "texts": self.texts}


def _answer_field(label_type: label_types.LabelType) -> str:
    (field,) = label_type.label_fields()
    return field


def check_items(items, label_type: label_types.LabelType) -> List[dict]:
    """Unlabelled records as plain JSON: `query` and the label type's sample fields as lists of ints."""
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"items to label: expected a non-empty list of records, got {type(items).__name__} "
                         f"of length {len(items) if hasattr(items, '__len__') else '?'}")
    answer = _answer_field(label_type)
    checked = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"item {index}: expected a record (dict), got {type(item).__name__}")
        if answer in item:
            raise ValueError(f"item {index} already has the label field {answer!r}; items to label are records "
                             f"without it")
        record = dict(item)
        for field in ["query", *label_type.sample_fields()]:
            if field not in item:
                raise ValueError(f"item {index}: field {field!r} is missing ({label_type.name} items have query, "
                                 f"{', '.join(label_type.sample_fields())})")
            try:
                tokens = [int(token) for token in item[field]]
            except (TypeError, ValueError):
                raise ValueError(f"item {index}, field {field!r}: expected a list of token ids") from None
            record[field] = tokens
        checked.append(record)
    return checked


def _decode(encoder, tokens: Sequence[int]) -> str:
    if encoder is None:  # no encoder given: show the token ids
        return " ".join(str(token) for token in tokens)
    return encoder.decode(tokens)


def load_label_set(path: str) -> Optional[LabelSet]:
    """The items file at `path`, or None when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the items of this labeling job ({error})") from None
    if not isinstance(content, dict) or content.get("format") != ITEMS_FORMAT:
        raise ValueError(f"{path}: not an items file of the labeling app; move it away or choose another OUTPUT")
    try:
        return LabelSet(label_type=content["label_type"], items=content["items"], texts=content["texts"],
                        double=content["double"], overlap=content["overlap"], made_by=content.get("made_by"))
    except KeyError as error:
        raise ValueError(f"{path}: the items file lacks {error}; it is damaged") from None


def check_new_job(paths: LabelFiles):
    """A new job must not overwrite anything: no output or journal of something else at its paths."""
    if os.path.exists(paths.journal):
        raise ValueError(f"{paths.journal} exists but its items file {paths.items} does not; label into another "
                         f"OUTPUT, or move that journal away")
    if os.path.exists(paths.output):
        raise ValueError(f"{paths.output} exists and is not the output of an unfinished labeling job (no "
                         f"{os.path.basename(paths.items)} beside it); choose another OUTPUT or remove it")


def prepare_label_set(paths: LabelFiles, items: List[dict], label_type: label_types.LabelType, overlap: float,
                      encoder=None, made_by: Optional[dict] = None) -> LabelSet:
    """The label set of this job: the recorded one when the same items were started before (resume), else a new
    one, written atomically to the items file. Refuses to mix jobs."""
    existing = load_label_set(paths.items)
    if existing is not None:
        if existing.label_type != label_type.name or existing.items != items:
            raise ValueError(f"{paths.items} holds the items of another labeling job ({existing.label_type}, "
                             f"{len(existing.items)} items); label into another OUTPUT, or move the job's files "
                             f"away ({paths.items}, {paths.journal})")
        if not math.isclose(existing.overlap, overlap):
            raise ValueError(f"this labeling job ({paths.items}) was started with --overlap {existing.overlap}; "
                             f"resume it with the same --overlap")
        return existing
    check_new_job(paths)
    texts = [{"query": _decode(encoder, item["query"]),
              "samples": [_decode(encoder, item[field]) for field in label_type.sample_fields()]} for item in items]
    double = sorted(random.Random(len(items)).sample(range(len(items)), round(overlap * len(items))))
    label_set = LabelSet(label_type=label_type.name, items=items, texts=texts, double=double, overlap=overlap,
                         made_by=made_by)
    files.write_text_atomic(paths.items, json.dumps(label_set.to_json()) + "\n")
    return label_set


# ----- the journal ------------------------------------------------------------------------------------------------

class Journal:
    """Append-only JSON lines, each fsync'd before `append` returns. Opening it takes an exclusive lock (one
    server per job) and drops a torn last line: a write cut off by a kill was never acknowledged."""

    def __init__(self, path: str):
        self.path = path
        created = not os.path.exists(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ValueError(f"another labeling server is using {path}; stop it first (one server per "
                             f"OUTPUT)") from None
        if created:
            _fsync_directory(os.path.dirname(path))  # the new file's name survives a crash too
        self.dropped_torn_line = False
        self.events = self._read()

    def _read(self) -> List[dict]:
        with open(self.path, "rb") as f:
            data = f.read()
        complete, _, torn = data.rpartition(b"\n")
        if torn:  # the end of the file is not the end of a line: an interrupted append
            os.ftruncate(self._fd, len(complete) + 1 if complete else 0)
            os.fsync(self._fd)
            self.dropped_torn_line = True
        events = []
        for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
            try:
                event = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{self.path}, line {number}: not a JSON object ({error}); the journal is "
                                 f"damaged, repair or remove that line") from None
            if not isinstance(event, dict):
                raise ValueError(f"{self.path}, line {number}: expected a JSON object, got {line[:80]!r}")
            events.append(event)
        return events

    def append(self, event: dict):
        data = (json.dumps(event) + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
            os.fsync(self._fd)  # on disk before the client hears "recorded"
        except OSError as error:  # e.g. a full disk: take back any part written, so later lines stay whole
            os.ftruncate(self._fd, size)
            raise ApiError(503, f"the answer could not be recorded ({error.strerror or error}); nothing was "
                                f"recorded, try again") from None
        self.events.append(event)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fsync_directory(directory: str):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- answers ------------------------------------------------------------------------------------------------------

def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_answer(label_type: label_types.LabelType, field: str, value):
    """The answer as recorded (int choice, float score or difference); ApiError 400 when out of range."""
    if field == "best":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"'best' must be an integer index in [0, {label_type.num_samples}), got {value!r}")
        if not 0 <= value < label_type.num_samples:
            raise ApiError(400, f"'best' is {value}, out of range: the choice is one of the "
                                f"{label_type.num_samples} samples, 0..{label_type.num_samples - 1}")
        return value
    low, high = RATING_RANGE if field == "score" else COMPARE_RANGE
    if not _number(value) or not low <= value <= high:
        meaning = ("a rating from 1 (very bad) to 7 (very good)" if field == "score" else
                   "how much better sample1 (right) is than sample0 (left), from -3 to 3")
        raise ApiError(400, f"{field!r} must be a number in [{low}, {high}], {meaning}; got {value!r}")
    return float(value)


def answers_agree(field: str, a, b) -> bool:
    """Whether two labelers' answers to one item agree: same choice; ratings within one point; comparisons
    on the same side (both 0 counts as agreeing)."""
    if field == "best":
        return a == b
    if field == "score":
        return abs(a - b) <= 1
    return (a > 0) - (a < 0) == (b > 0) - (b < 0)


AGREEMENT_RULES = {"best": "same choice", "score": "ratings within one point",
                   "difference": "same side (or both 'about the same')"}


def check_labeler(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "'labeler' is required: a name for the person labelling (1-64 characters)")
    name = name.strip()
    if len(name) > MAX_LABELER_NAME or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ApiError(400, f"'labeler' must be 1-{MAX_LABELER_NAME} printable characters")
    return name


# ----- the state of a labeling job -------------------------------------------------------------------------------

@dataclasses.dataclass
class Label:
    seq: int  # the journal event number
    item: int
    labeler: str
    value: object
    time: float  # seconds since the epoch


class Labeling:
    """Who labels what: answers (replayed from the journal, then recorded in it), assignments, skips, progress.
    Thread-safe; every change is in the journal before the method returns."""

    def __init__(self, label_set: LabelSet, journal: Journal, clock: Callable[[], float] = time.monotonic):
        self.label_set = label_set
        self.label_type = label_types.get(label_set.label_type)
        self.field = _answer_field(self.label_type)
        self.journal = journal
        self.clock = clock
        self.required = [1] * len(label_set.items)  # answers each item needs
        for item in label_set.double:
            self.required[item] = 2
        self.labels: List[List[Label]] = [[] for _ in label_set.items]  # live answers per item, oldest first
        self.history: Dict[str, List[Label]] = {}  # each labeler's live answers, newest last (for undo)
        self.assigned: Dict[str, Tuple[int, float]] = {}  # labeler -> (item, clock time handed out)
        self.skipped: Dict[str, Set[int]] = {}
        self.session: Dict[str, List[float]] = {}  # labeler -> [clock of first task here, answers here]
        self.lock = threading.Lock()
        self.finished = threading.Event()  # every item has its answers; nothing more is accepted
        for number, event in enumerate(journal.events, start=1):
            self._replay(event, f"{journal.path}, line {number}")
        if self._complete():
            self.finished.set()

    # ----- replay ----------------------------------------------------------------------------------------------
    def _replay(self, event: dict, where: str):
        try:
            kind, seq, labeler = event["event"], event["seq"], event["labeler"]
            if kind == "label":
                item = event["id"]
                if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < len(self.labels):
                    raise ValueError(f"unknown item {item!r}")
                value = check_answer(self.label_type, self.field, event[self.field])
                self._add(Label(seq, item, labeler, value, event["time"]))
            elif kind == "undo":
                self._remove(labeler, event["undoes"])
            else:
                raise ValueError(f"unknown event {kind!r}")
        except (KeyError, ValueError, ApiError) as error:
            raise ValueError(f"{where}: {error}; the journal does not fit the items file "
                             f"{os.path.basename(self.journal.path)} was made with") from None

    def _add(self, label: Label):
        self.labels[label.item].append(label)
        self.history.setdefault(label.labeler, []).append(label)

    def _remove(self, labeler: str, seq: int) -> Label:
        mine = self.history.get(labeler, [])
        if not mine or mine[-1].seq != seq:
            raise ValueError(f"undo of event {seq}, which is not {labeler!r}'s last answer")
        label = mine.pop()
        self.labels[label.item].remove(label)
        return label

    # ----- counts ----------------------------------------------------------------------------------------------
    def _missing(self, item: int) -> int:
        return max(self.required[item] - len(self.labels[item]), 0)

    def _complete(self) -> bool:
        return all(self._missing(item) == 0 for item in range(len(self.labels)))

    def _remaining(self) -> int:
        """Items still waiting for an answer."""
        return sum(1 for item in range(len(self.labels)) if self._missing(item))

    # ----- what a labeler sees ---------------------------------------------------------------------------------
    def _leased_by_others(self, item: int, labeler: str, now: float) -> int:
        return sum(1 for name, (held, since) in self.assigned.items()
                   if held == item and name != labeler and now - since < LEASE_SECONDS)

    def _pick(self, labeler: str, now: float) -> Optional[int]:
        skipped = self.skipped.get(labeler, set())
        open_items = [item for item in range(len(self.labels))
                      if self._missing(item) - self._leased_by_others(item, labeler, now) > 0
                      and all(label.labeler != labeler for label in self.labels[item])]
        # Items that wait for a second labeler first: agreement is measured early, and a pair is not left open.
        open_items.sort(key=lambda item: (item in skipped, not self.labels[item], item))
        return open_items[0] if open_items else None

    def _task(self, item: int) -> dict:
        texts = self.label_set.texts[item]
        return {"id": item, "type": self.label_type.name, "query": texts["query"], "samples": texts["samples"]}

    def next_task(self, labeler: str) -> Optional[dict]:
        """The item this labeler should answer (the one already handed out, if any), or None."""
        with self.lock:
            now = self.clock()
            self.session.setdefault(labeler, [now, 0])
            if self.finished.is_set():
                return None
            held = self.assigned.get(labeler)
            if held is not None and self._missing(held[0]) == 0:
                del self.assigned[labeler]  # its lease ran out and others answered it meanwhile
                held = None
            if held is not None:
                item = held[0]
            else:
                item = self._pick(labeler, now)
                if item is None:
                    return None
            self.assigned[labeler] = (item, now)
            return self._task(item)

    # ----- answers ----------------------------------------------------------------------------------------------
    def _check_item(self, item) -> int:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ApiError(400, f"'id' must be the integer id of an item, got {item!r}")
        if not 0 <= item < len(self.labels):
            raise ApiError(404, f"unknown item {item}: ids are 0..{len(self.labels) - 1}")
        return item

    def _check_open(self):
        if self.finished.is_set():
            raise ApiError(409, "labeling is complete: every item has its answers")

    def _check_assigned(self, labeler: str, item: int, action: str):
        if any(label.labeler == labeler for label in self.labels[item]):
            raise ApiError(409, f"{labeler!r} already answered item {item} (use undo to change the last answer)")
        if self.assigned.get(labeler, (None,))[0] != item:
            raise ApiError(409, f"item {item} is not assigned to {labeler!r}; GET /api/task?labeler=... first, "
                                f"then {action} the item it returns")

    def submit(self, labeler: str, item, value) -> int:
        """Record an answer (checked: ApiError, nothing recorded); returns the number of items still waiting."""
        with self.lock:
            self._check_open()
            item = self._check_item(item)
            value = check_answer(self.label_type, self.field, value)
            self._check_assigned(labeler, item, "answer")
            event = {"event": "label", "seq": len(self.journal.events) + 1, "id": item, "labeler": labeler,
                     self.field: value, "time": time.time()}
            self.journal.append(event)  # durable before anything else changes
            self._add(Label(event["seq"], item, labeler, value, event["time"]))
            del self.assigned[labeler]
            self.session.setdefault(labeler, [self.clock(), 0])[1] += 1
            if self._complete():
                self.finished.set()
            return self._remaining()

    def skip(self, labeler: str, item) -> int:
        """Hand an assigned item back: it goes to others first. Not journalled (nothing to lose)."""
        with self.lock:
            self._check_open()
            item = self._check_item(item)
            self._check_assigned(labeler, item, "skip")
            del self.assigned[labeler]
            self.skipped.setdefault(labeler, set()).add(item)
            return self._remaining()

    def undo(self, labeler: str) -> Tuple[int, int]:
        """Take back this labeler's last answer; the item becomes their task again. (item, items waiting)."""
        with self.lock:
            self._check_open()
            mine = self.history.get(labeler)
            if not mine:
                raise ApiError(409, f"{labeler!r} has no answer to undo")
            last = mine[-1]
            self.journal.append({"event": "undo", "seq": len(self.journal.events) + 1, "undoes": last.seq,
                                 "id": last.item, "labeler": labeler, "time": time.time()})
            self._remove(labeler, last.seq)
            self.assigned[labeler] = (last.item, self.clock())
            session = self.session.get(labeler)
            if session and session[1] > 0:
                session[1] -= 1
            return last.item, self._remaining()

    def stop(self):
        """Accept nothing more (Ctrl-C): what is in the journal is what gets exported."""
        self.finished.set()

    # ----- results -------------------------------------------------------------------------------------------
    def _pairs(self):
        """(item, first answer, second answer) of every item answered by two labelers."""
        return [(item, labels[0], labels[1]) for item, labels in enumerate(self.labels) if len(labels) >= 2]

    def progress(self) -> dict:
        with self.lock:
            now = self.clock()
            pairs = self._pairs()
            agreed = sum(answers_agree(self.field, a.value, b.value) for _, a, b in pairs)
            labelers = {}
            for name, mine in sorted(self.history.items()):
                start, answered = self.session.get(name, (now, 0))
                labelers[name] = {"labels": len(mine), "per_hour": round(_per_hour(answered, now - start), 1)}
            starts = [start for start, _ in self.session.values()]
            answered_here = sum(answered for _, answered in self.session.values())
            agreement = {"double_items": len(self.label_set.double), "compared": len(pairs), "agreed": agreed,
                         "rate": agreed / len(pairs) if pairs else None, "rule": AGREEMENT_RULES[self.field]}
            if self.field == "best":
                agreement["chance"] = 1 / self.label_type.num_samples
            return {"type": self.label_type.name, "total": len(self.labels),
                    "done": len(self.labels) - self._remaining(),
                    "labeled": sum(1 for labels in self.labels if labels), "remaining": self._remaining(),
                    "labels": sum(len(labels) for labels in self.labels),
                    "in_progress": len(self.assigned), "complete": self._complete(),
                    "per_hour": round(_per_hour(answered_here, now - min(starts)) if starts else 0.0, 1),
                    "labelers": labelers, "agreement": agreement}

    def records(self) -> List[dict]:
        """The export: one record per answered item, in item order, with the first labeler's answer."""
        with self.lock:
            return [{**self.label_set.items[item], self.field: labels[0].value}
                    for item, labels in enumerate(self.labels) if labels]

    def disagreements(self) -> List[dict]:
        """Items whose two labelers disagreed, with every answer."""
        with self.lock:
            result = []
            for item, first, second in self._pairs():
                if not answers_agree(self.field, first.value, second.value):
                    result.append({"id": item, **self.label_set.items[item], "texts": self.label_set.texts[item],
                                   "answers": [{"labeler": label.labeler, self.field: label.value,
                                                "time": label.time} for label in self.labels[item]]})
            return result


def _per_hour(count: int, seconds: float) -> float:
    return count * 3600.0 / max(seconds, 60.0)  # at least a minute, so the first answers do not read as 1000s/h


def export(labeling: Labeling, paths: LabelFiles) -> List[dict]:
    """Write OUTPUT.json (released format) and the disagreements, atomically; returns the records."""
    records = labeling.records()
    files.write_text_atomic(paths.output, json.dumps(records) + "\n")
    files.write_text_atomic(paths.disagreements, json.dumps(labeling.disagreements(), indent=1) + "\n")
    return records


# ----- the web app ------------------------------------------------------------------------------------------------

def _host_name(host_header: str) -> str:
    """The host part of a Host header: 'example.org:8000' -> 'example.org', '[::1]:80' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


def create_app(labeling: Labeling, *, instructions: str, token: Optional[str] = None):
    """The Flask app: the page and the JSON API (module docstring)."""
    import flask
    from werkzeug.exceptions import HTTPException

    app = flask.Flask(__name__, template_folder="web", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    label_type = labeling.label_type

    def error(status: int, message: str):
        response = flask.jsonify({"error": message})
        response.status_code = status
        return response

    @app.errorhandler(ApiError)
    def api_error(exception: ApiError):
        return error(exception.status, str(exception))

    @app.errorhandler(HTTPException)
    def http_error(exception: HTTPException):  # 404, 405, 413 ... as JSON too
        return error(exception.code or 500, f"{exception.name}: {exception.description}")

    @app.before_request
    def check_request():
        if token is not None:
            given = flask.request.headers.get("X-Label-Token") or flask.request.args.get("token") or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise ApiError(401, "a valid token is required: open the URL with ?token=... that the server "
                                    "printed, or send the X-Label-Token header")
        elif not is_loopback(_host_name(flask.request.host)):
            # Served without a token only to this machine: a page of another site that made its name resolve
            # to 127.0.0.1 (DNS rebinding) must not reach the API.
            raise ApiError(403, f"this server answers only requests for localhost, not {flask.request.host!r}")
        if flask.request.method == "POST" and flask.request.mimetype != "application/json":
            raise ApiError(415, "send the request body as JSON with Content-Type: application/json")

    @app.after_request
    def harden(response):
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    def body(allowed: Set[str]) -> dict:
        data = flask.request.get_data(cache=False)  # 413 beyond MAX_CONTENT_LENGTH
        try:
            content = json.loads(data)
        except ValueError as parse_error:
            raise ApiError(400, f"the body is not valid JSON ({parse_error})") from None
        if not isinstance(content, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(content).__name__}")
        unknown = sorted(set(content) - allowed)
        if unknown:
            raise ApiError(400, f"unexpected field(s) {', '.join(map(repr, unknown))}; a {label_type.name} request "
                                f"has {', '.join(sorted(allowed))}")
        return content

    @app.get("/")
    def page():
        nonce = secrets.token_urlsafe(16)
        config = {"type": label_type.name, "field": labeling.field, "num_samples": label_type.num_samples,
                  "instructions": instructions, "rating_scale": RATING_SCALE, "compare_scale": COMPARE_SCALE,
                  "compare_values": list(range(COMPARE_RANGE[0], COMPARE_RANGE[1] + 1))}
        response = flask.make_response(flask.render_template("label_page.html", config=config, nonce=nonce))
        # Even if model text were ever put into the page as HTML, no script of it could run.
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
            f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return response

    @app.get("/api/task")
    def task():
        labeler = check_labeler(flask.request.args.get("labeler"))
        found = labeling.next_task(labeler)
        if found is None:
            return "", 204
        return flask.jsonify(found)

    @app.post("/api/label")
    def label():
        content = body({"id", "labeler", labeling.field})
        labeler = check_labeler(content.get("labeler"))
        if "id" not in content:
            raise ApiError(400, "'id' is required: the id of the item answered (from /api/task)")
        if labeling.field not in content:
            raise ApiError(400, f"{labeling.field!r} is required: a {label_type.name} label gives "
                                f"{_describe_answer(labeling.field, label_type)}")
        return flask.jsonify({"remaining": labeling.submit(labeler, content["id"], content[labeling.field])})

    @app.post("/api/skip")
    def skip():
        content = body({"id", "labeler"})
        labeler = check_labeler(content.get("labeler"))
        if "id" not in content:
            raise ApiError(400, "'id' is required: the id of the item skipped")
        return flask.jsonify({"remaining": labeling.skip(labeler, content["id"])})

    @app.post("/api/undo")
    def undo():
        content = body({"labeler"})
        item, remaining = labeling.undo(check_labeler(content.get("labeler")))
        return flask.jsonify({"id": item, "remaining": remaining})

    @app.get("/api/progress")
    def progress():
        return flask.jsonify(labeling.progress())

    return app


def _describe_answer(field: str, label_type: label_types.LabelType) -> str:
    if field == "best":
        return f"'best', the index of the best sample, 0..{label_type.num_samples - 1}"
    if field == "score":
        return "'score', a rating from 1 (very bad) to 7 (very good)"
    return "'difference', how much better sample1 (right) is than sample0 (left), from -3 to 3"


class LabelServer:
    """The web app served on a background thread (werkzeug's threaded server). `url` opens the page."""

    def __init__(self, labeling: Labeling, options: ServingOptions, instructions: str):
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args, **kwargs):  # one line per request would bury the announcements,
                pass  # and the token would end up in logs

        app = create_app(labeling, instructions=instructions, token=options.token)
        try:
            self._server = make_server(options.host, options.port, app, threaded=True,
                                       request_handler=QuietHandler)
        except OSError as error:
            raise ValueError(f"cannot serve on {options.host}:{options.port}: {error.strerror or error}; choose "
                             f"another --port (or --port 0 for any free one)") from None
        self.port = self._server.server_port
        shown = options.host
        if shown in ("0.0.0.0", "::"):
            shown = socket.gethostname()  # reachable from other machines by this machine's name
        elif ":" in shown:
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{self.port}/" + (f"?token={options.token}" if options.token else "")
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="label-server", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# ----- the whole job -------------------------------------------------------------------------------------------

def say(message: str):
    """Announce on stdout at once (a pipe or `tee` would otherwise hold the URL back)."""
    print(message, flush=True)


def collect_labels(items: List[dict], label_type_name: str, output: str, *, host="127.0.0.1", port=8000,
                   token=None, overlap=0.0, instructions: Optional[str] = None, encoder=None,
                   announce: Callable[[str], None] = say, made_by: Optional[dict] = None) -> List[dict]:
    """Serve `items` to people in a web page until every one is labelled; returns the labelled records.

    items: records in the released format without the label field (`query`, `sample0`.. or `sample`, token
    lists); label_type_name: best_of_N, scalar_rating or scalar_compare; output: the local path of the label
    file (OUTPUT.json), with the items file, journal and disagreements next to it (module docstring); a job
    started before with the same items resumes from its journal. host/port/token/overlap: see
    `serving_options`; instructions: the task instructions shown on the page (default: generic ones);
    encoder: decodes tokens for the page (None: token ids are shown); announce: where the URL and the end are
    reported; made_by: a description of what sampled the items, kept in the items file.

    On Ctrl-C, SIGINT or SIGTERM (a KeyboardInterrupt) the labels so far are exported and the interrupt is
    re-raised.
    """
    label_type = label_types.get(label_type_name)
    options = serving_options(host, port, token, overlap)
    paths = label_files(output)
    items = check_items(items, label_type)
    label_set = prepare_label_set(paths, items, label_type, options.overlap, encoder, made_by)
    return serve_label_set(label_set, paths, options, instructions or GENERIC_INSTRUCTIONS, announce)


@contextlib.contextmanager
def interrupt_on(*signums: int):
    """Within: each of `signums` raises KeyboardInterrupt, which the serving answers by exporting the labels so far.

    Set explicitly even for SIGINT: Python installs its own Ctrl-C handler only when SIGINT is at its default at
    start, and a command started in the background by a non-interactive shell (`cmd &` in a script, a CI runner)
    inherits it ignored; a `kill -INT` would then never export. Python allows handlers in the main thread only;
    elsewhere nothing changes.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, signal.default_int_handler) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve_label_set(label_set: LabelSet, paths: LabelFiles, options: ServingOptions, instructions: str,
                    announce: Callable[[str], None] = say) -> List[dict]:
    """Serve a prepared label set until it is done (see collect_labels)."""
    with Journal(paths.journal) as journal:
        if journal.dropped_torn_line:
            announce(f"dropped an incomplete last line of {paths.journal} (an answer cut off by a crash, never "
                     f"acknowledged)")
        labeling = Labeling(label_set, journal)
        total = len(label_set.items)
        if labeling.finished.is_set():
            records = export(labeling, paths)
            announce(f"all {total} items were already labelled; wrote {len(records)} labels to {paths.output}")
            return records
        answered = sum(1 for labels in labeling.labels if labels)
        # `kill` stops like Ctrl-C; a caller may add signals of its own (an online run: all its stop signals)
        with LabelServer(labeling, options, instructions) as server, interrupt_on(signal.SIGINT, signal.SIGTERM):
            resumed = f", resuming with {answered} of {total} labelled" if answered else ""
            announce(f"labeling {total} {label_set.label_type} items{resumed}: open {server.url}")
            if options.token and not is_loopback(options.host):
                announce("  every request needs the token in that URL; share it only with your labelers")
            try:
                # Polled with sleep, not Event.wait: Python raises KeyboardInterrupt between any two bytecodes, so
                # a Ctrl-C inside Event.wait's lock handling could leave the event's (non-reentrant) lock held by
                # this thread, and labeling.stop() below, which sets the event, would then block forever.
                while not labeling.finished.is_set():
                    time.sleep(0.2)
            except KeyboardInterrupt:
                labeling.stop()  # no answer slips in between the export and the shutdown
                records = export(labeling, paths)
                announce(f"\ninterrupted: wrote the {len(records)} labels so far to {paths.output}; run the same "
                         f"command again to resume (journal {paths.journal})")
                raise
        records = export(labeling, paths)
        progress = labeling.progress()
        agreement = progress["agreement"]
        agreed = (f"; labelers agreed on {agreement['agreed']} of {agreement['compared']} double-labelled items"
                  if agreement["compared"] else "")
        announce(f"all {total} items labelled: wrote {len(records)} labels to {paths.output}{agreed}")
        return records
