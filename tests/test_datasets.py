"""Query datasets read from local files made here; remote failures are simulated."""
import hashlib
import itertools
import json
import os
import random

import pytest

from lm_human_preferences.language import datasets
from lm_human_preferences.utils import files


def write(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def jsonl(items):
    return "".join(json.dumps(item) + "\n" for item in items)


def order_of_2019(items):
    """The order the 2019 code read a dataset in: Python's global random.seed(0); random.shuffle."""
    state = random.getstate()
    try:
        items = list(items)
        random.seed(0)
        random.shuffle(items)
    finally:
        random.setstate(state)
    return items


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown query dataset 'wiki'; known datasets: books, tldr, cnndm, test"):
        datasets.get("wiki")


# ----- books -----------------------------------------------------------------------------------------------

def test_books_from_a_directory_reads_the_mode_file(tmp_path):
    write(tmp_path / "train.jsonl", jsonl(["first train passage.", "second train passage."]))
    write(tmp_path / "test.jsonl", jsonl(["the test passage."]))
    books = datasets.get("books")
    assert list(books("train", source=str(tmp_path), shuffle=False)) == ["first train passage.",
                                                                         "second train passage."]
    assert list(books("test", source=str(tmp_path))) == ["the test passage."]


def test_books_jsonl_holds_strings_or_text_objects(tmp_path):
    path = write(tmp_path / "passages.jsonl", jsonl(["a string.", {"text": "an object.", "id": 3}]) + "\n")
    assert list(datasets.books("train", source=path, shuffle=False)) == ["a string.", "an object."]
    assert list(datasets.books("test", source=path, shuffle=False)) == ["a string.", "an object."]  # both modes


def test_books_jsonl_errors_name_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", jsonl(["fine."]) + "{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not JSON"):
        datasets.books("train", source=path)
    path = write(tmp_path / "numbers.jsonl", jsonl(["fine.", 17]))
    with pytest.raises(ValueError, match=r"numbers.jsonl, line 2: expected a JSON string or an object with a "
                                         r"\"text\" string, got int"):
        datasets.books("train", source=path)


def test_books_from_plain_text_are_passages(tmp_path):
    long_paragraph = " ".join(f"Sentence number {i} of the long paragraph." for i in range(200))  # ~8,000 chars
    book = ("CHAPTER I.\n\n\"Yes,\" she said.\n\n"
            + "It was a dark\nand stormy night; the rain fell in torrents. " * 3 + "\n\n\n"
            + long_paragraph + "\n\n" + "Short.\n\n" * 300 + "THE END.\n")
    passages = datasets.books("train", source=write(tmp_path / "book.txt", book), shuffle=False)
    assert all("\n" not in p for p in passages)  # line breaks inside paragraphs are joined
    assert passages[0].startswith("CHAPTER I. \"Yes,\" she said. It was a dark and stormy night;")
    assert all(len(p) <= 2000 for p in passages)
    shorts = [p for p in passages if p.startswith("Short.")]
    assert len(shorts) > 1 and all(len(p) >= 400 for p in shorts[:-1])  # short paragraphs are joined
    assert passages[-1].endswith("Short. THE END.")
    pieces_of_long = [p for p in passages if "Sentence number" in p]
    assert all(p.endswith(".") for p in pieces_of_long)  # cut at sentence ends
    assert " ".join(" ".join(passages).split()) == " ".join(book.split())  # nothing lost or reordered


def test_books_are_in_the_2019_order(tmp_path):
    """2019 shuffled the passages with random.seed(0) whatever the run's seed, once; the query stream
    replays that order on every pass."""
    passages = [f"Passage number {i}." for i in range(50)]
    path = write(tmp_path / "train.jsonl", jsonl(passages))
    for seed in (0, 5):
        assert list(datasets.books("train", source=path, seed=seed)) == order_of_2019(passages)
    state = random.getstate()
    datasets.books("train", source=path)
    assert random.getstate() == state  # the global generator is left alone


def test_split_passages_cuts_text_without_sentence_ends_hard():
    assert [len(p) for p in datasets.split_passages("x" * 4500)] == [2000, 2000, 500]


def test_books_default_url_is_gone_and_the_error_says_what_to_set(monkeypatch):
    requested = []

    def not_found(path, **kwargs):
        requested.append(path)
        raise files.FileFetchError(f"HTTP 404 for {path}", url=path, status=404)

    monkeypatch.setattr(files, "read_text", not_found)
    with pytest.raises(ValueError) as error:
        datasets.books("train")
    assert requested == ["https://openaipublic.blob.core.windows.net/lm-human-preferences/datasets/"
                         "book_passages/train.jsonl"]
    message = str(error.value)
    assert "HTTP 404" in message and "--task.query_source" in message and "no longer served" in message


def closed_port():
    """A local port nobody listens on: a connection is refused at once, no network is touched."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_books_default_url_unreachable_tells_the_user_about_query_source(tmp_path, monkeypatch):
    """The real fetch path (files.local_path, cache, retries) against a host that refuses connections."""
    url = f"http://127.0.0.1:{closed_port()}/lm-human-preferences/datasets/book_passages"
    monkeypatch.setattr(datasets, "BOOKS_URL", url)
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LMHP_FETCH_RETRIES", "0")
    monkeypatch.setattr(files, "RETRIES", 0)  # read from the environment at import
    with pytest.raises(ValueError) as error:
        datasets.get("books")("test")
    message = str(error.value)
    assert f"cannot read {url}/test.jsonl" in message
    assert "--task.query_source" in message and "train.jsonl and test.jsonl" in message
    assert str(tmp_path / "cache") in message  # the cache path, so an offline user can place the file there
    assert not [name for _, _, names in os.walk(tmp_path / "cache") for name in names]  # nothing cached


def test_books_missing_source_file_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"dataset books: cannot read .*nowhere.jsonl.*--task.query_source accepts"):
        datasets.books("train", source=str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(ValueError, match=r"cannot read .*train.jsonl"):  # a directory without the mode's file
        datasets.books("train", source=str(tmp_path))


def test_books_remote_directory_source_reads_the_mode_file(monkeypatch):
    requested = []
    monkeypatch.setattr(files, "read_text", lambda path, **kwargs: requested.append(path) or jsonl(["x."]))
    datasets.books("test", source="https://example.com/my_books")
    datasets.books("train", source="gs://bucket/books.jsonl")
    assert requested == ["https://example.com/my_books/test.jsonl", "gs://bucket/books.jsonl"]


def test_unknown_mode_lists_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match=r"dataset books: unknown mode 'valid'; accepted: train, test"):
        datasets.books("valid", source=str(tmp_path))


# ----- tldr ------------------------------------------------------------------------------------------------

def test_tldr_reads_train_and_valid_and_cleans(tmp_path):
    write(tmp_path / "train-subset.json", json.dumps([
        {"content": "  I donâ€™t know.\n\n\n\n\nWhat now?  \n", "subreddit": "x"},
        {"content": "Second post.\n\nTwo newlines stay."}]))
    write(tmp_path / "valid-subset.json", json.dumps([{"content": "Validation post."}]))
    train = datasets.get("tldr")("train", source=str(tmp_path), shuffle=False)
    assert len(train) == 2
    assert list(train) == ["I don't know.\n\nWhat now?", "Second post.\n\nTwo newlines stay."]
    assert list(datasets.tldr("test", source=str(tmp_path))) == ["Validation post."]  # test mode reads valid
    assert list(datasets.tldr("valid", source=str(tmp_path))) == ["Validation post."]


def test_tldr_is_in_the_2019_order(tmp_path):
    posts = [f"Post {i}.\n\n\n\nEnd {i}." for i in range(30)]
    write(tmp_path / "train-subset.json", json.dumps([{"content": post} for post in posts]))
    train = datasets.tldr("train", source=str(tmp_path), seed=9)
    assert isinstance(train, datasets.LazyTexts)  # ftfy is slow: a text is cleaned when it is read
    assert list(train) == [post.replace("\n\n\n\n", "\n\n") for post in order_of_2019(posts)]


def test_tldr_default_urls(monkeypatch):
    requested = []
    monkeypatch.setattr(files, "read_text", lambda path, **kwargs: requested.append(path) or "[]")
    datasets.tldr("train")
    datasets.tldr("test")
    assert requested == ["https://openaipublic.blob.core.windows.net/lm-human-preferences/tldr/train-subset.json",
                         "https://openaipublic.blob.core.windows.net/lm-human-preferences/tldr/valid-subset.json"]


def test_tldr_bad_files(tmp_path):
    write(tmp_path / "train-subset.json", json.dumps([{"content": "ok"}, {"body": "no content"}]))
    with pytest.raises(ValueError, match=r"train-subset.json, item 1 has no \"content\" string"):
        datasets.tldr("train", source=str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot read .*valid-subset.json.*--task.query_source"):
        datasets.tldr("test", source=str(tmp_path))


# ----- cnndm -----------------------------------------------------------------------------------------------

CNN_STORY = ("WASHINGTON (CNN) -- The Senate passed the bill on Tuesday.\n\n"
             "Senators voted 60 to 40 after a long debate.\n\n"
             "@highlight\n\nThe Senate passed the bill\n\n@highlight\n\nThe vote was 60-40\n")
DAILYMAIL_STORY = ("By\n\nAssociated Press\n\nPUBLISHED:\n\n14:11 EST, 25 October 2013\n\n|\n\nUPDATED:\n\n"
                   "15:36 EST, 25 October 2013\n\nThe bishop of Fargo has exposed church members to hepatitis A.\n\n"
                   "The state says the risk is low.\n\n@highlight\n\nBishop John Folda is taking time off\n")
DAILYMAIL_BYLINE = "By\n\nSophie Jane Evans\n\nA cat walked 200 miles home.\n\n@highlight\n\nCat walks home\n"

URLS = {
    "train": [("cnn", "http://www.cnn.com/2013/10/01/politics/senate-bill/index.html", CNN_STORY),
              ("dailymail", "http://www.dailymail.co.uk/news/article-1.html", DAILYMAIL_STORY),
              (None, "http://www.dailymail.co.uk/news/article-missing.html", None)],
    "test": [("dailymail", "http://www.dailymail.co.uk/news/article-3.html", DAILYMAIL_BYLINE)],
    "val": [("cnn", "http://edition.cnn.com/2014/01/01/world/valid/index.html", "(CNN)Valid story.\n")],
}


def story_path(root, site, url):
    return os.path.join(root, site, "stories", hashlib.sha1(url.encode("utf-8")).hexdigest() + ".story")


def make_stories(root, url_lists_dir=None, urls=URLS):
    for split, entries in urls.items():
        write(os.path.join(url_lists_dir or root, f"all_{split}.txt"), "".join(url + "\n" for _, url, _ in entries))
        for site, url, story in entries:
            if story is not None:
                write(story_path(root, site, url), story)
    return str(root)


def test_cnndm_reads_and_cleans_the_stories_of_the_url_list(tmp_path):
    source = make_stories(tmp_path)
    train = datasets.get("cnndm")("train", source=source, shuffle=False)
    assert len(train) == 2  # the URL without a story file is skipped
    assert list(train) == [
        "The Senate passed the bill on Tuesday.\n\nSenators voted 60 to 40 after a long debate.",
        "The bishop of Fargo has exposed church members to hepatitis A.\n\nThe state says the risk is low.",
    ]
    # "By" drops the first two lines, "By" and a blank one: the author's name stays (as in 2019)
    assert list(datasets.cnndm("test", source=source)) == ["Sophie Jane Evans\n\nA cat walked 200 miles home."]
    assert list(datasets.cnndm("valid", source=source)) == ["Valid story."]


def test_cnndm_shuffles_the_whole_url_list_then_drops_missing_stories(tmp_path, capsys):
    """The 2019 order: the full URL list shuffled with random.seed(0); stories missing from the directory are
    dropped afterwards, keeping the order of the rest, and reported once."""
    entries = [("cnn", f"http://www.cnn.com/2014/story-{i}.html", f"Story {i}.\n\n@highlight\n\nx\n")
               for i in range(40)]
    missing = {3, 4, 17, 30, 39}
    entries = [(site, url, None if i in missing else story) for i, (site, url, story) in enumerate(entries)]
    source = make_stories(tmp_path, urls={"train": entries})
    train = datasets.cnndm("train", source=source, seed=4)
    expected = [f"Story {i}." for i in order_of_2019(range(40)) if i not in missing]
    assert list(train) == expected
    out = capsys.readouterr().out
    assert out.count("dataset cnndm:") == 1
    assert f"dataset cnndm: 5 of 40 stories of all_train.txt are missing from {source}; they are skipped" in out


def test_cnndm_reports_nothing_when_no_story_is_missing(tmp_path, capsys):
    datasets.cnndm("test", source=make_stories(tmp_path))
    assert "missing" not in capsys.readouterr().out


def test_cnndm_url_lists_may_sit_in_a_url_lists_subdirectory(tmp_path):
    source = make_stories(tmp_path, url_lists_dir=tmp_path / "url_lists")
    assert list(datasets.cnndm("valid", source=source)) == ["Valid story."]


def test_cnndm_url_lists_are_fetched_when_not_in_the_source(tmp_path, monkeypatch):
    source = make_stories(tmp_path)
    os.remove(tmp_path / "all_val.txt")
    requested = []
    monkeypatch.setattr(files, "read_text",
                        lambda path, **kwargs: requested.append(path) or URLS["val"][0][1] + "\n")
    assert list(datasets.cnndm("valid", source=source)) == ["Valid story."]
    assert requested == ["https://openaipublic.blob.core.windows.net/lm-human-preferences/datasets/cnndm/"
                         "url_lists/all_val.txt"]


def test_cnndm_needs_a_local_stories_directory(tmp_path):
    with pytest.raises(ValueError, match=r"set --task.query_source to a local directory of CNN/DailyMail stories"):
        datasets.cnndm("train")
    write(tmp_path / "all_train.txt", "http://www.cnn.com/a.html\n")
    with pytest.raises(ValueError, match=r"none of the 1 stories of .*all_train.txt is in .*cnn/stories/<sha1"):
        datasets.cnndm("train", source=str(tmp_path))


@pytest.mark.parametrize("story, article", [
    # "By" at the very start: the first two lines go (here the byline and a blank line)
    ("By\n\nJohn Smith\n\nThe article.\n\n@highlight\n\nsummary", "John Smith\n\nThe article."),
    ("By John Smith\nPUBLISHED today\nThe article.", "The article."),
    ("Byron wrote poems.\nSecond line.\nThird line.", "Third line."),  # any text starting "By"
    (" By John\nA\nB", "By John\nA\nB"),  # not at the very start: kept
    # "(CNN) --" (one or more spaces before the dashes): what follows its last occurrence, anywhere
    ("LONDON, England (CNN) -- Rain fell.", "Rain fell."),
    ("A (CNN)  -- b (CNN) -- c" + " filler" * 30, "c" + " filler" * 30),
    ("(CNN)-- no space before the dashes", "-- no space before the dashes"),  # then the (CNN) rule
    # "(CNN)" within the first 100 characters: what follows the last one there; later ones stay
    ("ATLANTA, Georgia (CNN)The storm hit.", "The storm hit."),
    ("x" * 100 + " (CNN) stays.", "x" * 100 + " (CNN) stays."),
    ("(CNN)" + "y" * 90 + "(CNN)z", "z"),
    ("y" * 97 + "(CNN)z", "y" * 97 + "(CNN)z"),  # "(CNN)" straddles character 100: kept
    # a leading "and Name" line (left by a two-author byline) goes
    ("By\nJane Doe\nand Bob\nThe text.", "The text."),
    ("and Bob\nThe text.", "The text."),
    ("and Bob Smith\nThe text.", "and Bob Smith\nThe text."),  # two words: kept
    ("The text.\nand Bob\nmore", "The text.\nand Bob\nmore"),  # not leading: kept
    # what follows the last "UPDATED: hh:mm ... <a character of 2011|2012|...>" on one line
    ("PUBLISHED: 10:00 EST, 1 May 2013 | UPDATED: 11:45 EST, 1 May 2013\nThe news.", "The news."),
    ("UPDATED:\n\n15:36 EST, 25 October 2013\n\nThe news.", "The news."),
    ("Text.\nUPDATED: 09:30 GMT, 3 June 2014\nEnd.", "End."),  # anywhere in the text
    ("UPDATED: 9:30 EST, 1 May 2013\nKept.", "UPDATED: 9:30 EST, 1 May 2013\nKept."),  # one-digit hour
    # the character class quirk: any later 0-5, 1 or "|" on the line ends the match, at its last one
    ("UPDATED: 10:00 on Sunday 1 x\nThe news.", "x\nThe news."),
    ("UPDATED: 09:30, 3 June 2014. Later text.\nEnd.", ". Later text.\nEnd."),
    ("UPDATED: 10:00 on Sunday, no year\nThe news.", "UPDATED: 10:00 on Sunday, no year\nThe news."),
    # curly single quotes straightened, text stripped
    ("  It\u2019s \u2018fine\u2019.  ", "It's 'fine'."),
    # ftfy, runs of 3+ newlines made 2, the text before the first @highlight, stripped
    ("One.\n\n\n\nTwo.\n\n@highlight\n\nH1\n\n@highlight\n\nH2", "One.\n\nTwo."),
    ("Caf\u00c3\u00a9 owner.", "Caf\u00e9 owner."),  # mojibake fixed by ftfy
    ("@highlight\n\nonly highlights", ""),
])
def test_clean_story_follows_the_2019_rules(story, article):
    assert datasets.clean_story(story) == article


def test_clean_story_rules_apply_in_order():
    # "By" drops two lines; then "(CNN) --"; then "(CNN)" in the first 100 characters of what is left
    story = "By Ann\nand Bob\nPARIS (CNN) -- Lead (CNN) sentence.\n\n@highlight\n\nh"
    assert datasets.clean_story(story) == "sentence."
    # the "and Name" line is only dropped when it leads once the earlier rules are done
    assert datasets.clean_story("(CNN) -- and Bob\nText.") == "and Bob\nText."
    assert datasets.clean_story("(CNN) --and Bob\nText.") == "Text."


# ----- test ------------------------------------------------------------------------------------------------

def test_test_dataset_is_endless_seeded_random_strings():
    texts = list(itertools.islice(datasets.get("test")("train", seed=3), 2000))
    assert all(len(t) == 40 and set(t) <= set("abcdefghijklmnopqrstuvwxyz.") for t in texts)
    assert len(set(texts)) == 2000
    assert texts[:5] == list(itertools.islice(datasets.test("train", seed=3), 5))
    assert texts[:5] != list(itertools.islice(datasets.test("train", seed=4), 5))
    assert texts[:5] != list(itertools.islice(datasets.test("test", seed=3), 5))
