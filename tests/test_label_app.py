"""The labeling web app (label_app.py): people label in a real browser (Debian's Chromium driven by Playwright),
the JSON API refuses bad requests without recording anything, the token off loopback, model text shown as text,
a server killed with SIGKILL resumes from its journal, and `./launch.py label --judge human` / `--policy`."""

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import tensorflow.compat.v1 as tf
from test_launch import REPO_ROOT, cli_error

from lm_human_preferences import experiments, label_app, label_types, labeler, train_reward
from lm_human_preferences.language import encodings
from lm_human_preferences.language.trained_models import TrainedModel, save_model
from lm_human_preferences.policy import Policy

ENCODING = encodings.get("test")  # one token per character of "abcdefghijklmnopqrstuvwxyz."; padding 27
ENCODER = ENCODING.get_encoder()
E = ENCODER.encode("e")[0]
QUERY_LENGTH, RESPONSE_LENGTH = 3, 4  # the `test` experiment's task


def e_rule_items(count, seed=0, num_samples=4):
    """best_of_N items of the `test` task in which exactly one sample has the most e's (the labelers' rule)."""
    rng = np.random.RandomState(seed)
    not_e = [token for token in range(26) if token != E]
    items = []
    for _ in range(count):
        item = {"query": rng.choice(not_e, QUERY_LENGTH).tolist()}
        for n, e_count in enumerate(rng.permutation(num_samples)):  # 0..N-1 e's: one clear winner
            sample = rng.choice(not_e, RESPONSE_LENGTH)
            sample[rng.choice(RESPONSE_LENGTH, min(e_count, RESPONSE_LENGTH), replace=False)] = E
            item[f"sample{n}"] = sample.tolist()
        items.append(item)
    return items


def most_e(texts):
    return max(range(len(texts)), key=lambda n: texts[n].count("e"))


def validate_export(path, label_type="best_of_4"):
    with open(path) as f:
        records = json.load(f)
    label_types.validate_records(records, label_types.get(label_type), query_length=QUERY_LENGTH,
                                 response_length=RESPONSE_LENGTH, encoding=ENCODING, source=str(path))
    return records


class Served:
    """A label server running in this process on a free port of 127.0.0.1 (or `host`)."""

    def __init__(self, server, labeling, paths, token):
        self.base = f"http://127.0.0.1:{server.port}/"
        self.page_url = server.url.replace(server.url.split("/")[2], f"127.0.0.1:{server.port}")
        self.labeling, self.paths, self.token = labeling, paths, token

    def get(self, path, **kwargs):
        return requests.get(self.base + path, headers=self._headers(kwargs), timeout=10, **kwargs)

    def post(self, path, payload=None, **kwargs):
        return requests.post(self.base + path, json=payload, headers=self._headers(kwargs), timeout=10, **kwargs)

    def _headers(self, kwargs):
        headers = kwargs.pop("headers", {})
        if self.token and "X-Label-Token" not in headers:
            headers["X-Label-Token"] = self.token
        return headers

    def journal(self) -> bytes:
        with open(self.paths.journal, "rb") as f:
            return f.read()


@contextlib.contextmanager
def serving(tmp_path, items, label_type="best_of_4", *, encoder=ENCODER, host="127.0.0.1", token=None, overlap=0.0,
            instructions="Pick the sample with the most e's."):
    kind = label_types.get(label_type)
    options = label_app.serving_options(host, 0, token, overlap)
    paths = label_app.label_files(str(tmp_path / "labels.json"))
    label_set = label_app.prepare_label_set(paths, label_app.check_items(items, kind), kind, overlap, encoder)
    with label_app.Journal(paths.journal) as journal:
        labeling = label_app.Labeling(label_set, journal)
        with label_app.LabelServer(labeling, options, instructions) as server:
            yield Served(server, labeling, paths, options.token)


def answer(served, labeler_name, value_of=lambda task: most_e(task["samples"]), field="best"):
    """One item fetched and answered through the API: (id, value)."""
    task = served.get("api/task", params={"labeler": labeler_name})
    assert task.status_code == 200, task.text
    task = task.json()
    value = value_of(task)
    response = served.post("api/label", {"id": task["id"], "labeler": labeler_name, field: value})
    assert response.status_code == 200, response.text
    return task["id"], value


# ----- the API ------------------------------------------------------------------------------------------------------

def test_labels_go_to_different_labelers_overlap_items_to_two_and_the_export_is_the_released_format(tmp_path):
    items = e_rule_items(6)
    with serving(tmp_path, items, overlap=1 / 3) as served:  # 2 of the 6 items need two labelers
        double = served.labeling.label_set.double
        assert len(double) == 2
        ann = served.get("api/task", params={"labeler": "ann"}).json()
        bob = served.get("api/task", params={"labeler": "bob"}).json()
        assert set(ann) == {"id", "type", "query", "samples"} and ann["type"] == "best_of_4"
        assert ann["query"] == ENCODER.decode(items[ann["id"]]["query"])
        assert ann["samples"] == [ENCODER.decode(items[ann["id"]][f"sample{n}"]) for n in range(4)]
        assert ann["id"] != bob["id"] or ann["id"] in double  # only a double item goes to both at once
        # asking again gives the same item: a reloaded page shows what was on screen
        assert served.get("api/task", params={"labeler": "ann"}).json()["id"] == ann["id"]
        answers = {}
        for name in ["ann", "bob"] * 5:
            task = served.get("api/task", params={"labeler": name})
            if task.status_code == 204:
                continue
            task = task.json()
            # bob disagrees with ann on double items: he picks the sample with the fewest e's
            best = most_e(task["samples"]) if name == "ann" else int(np.argmin([s.count("e") for s in task["samples"]]))
            response = served.post("api/label", {"id": task["id"], "labeler": name, "best": best})
            assert response.status_code == 200, response.text
            answers.setdefault(task["id"], []).append((name, best))
        assert sorted(len(answers[item]) for item in answers) == [1, 1, 1, 1, 2, 2]
        assert {item for item in answers if len(answers[item]) == 2} == set(double)
        for name in ("ann", "bob"):
            assert served.get("api/task", params={"labeler": name}).status_code == 204
        assert response.json() == {"remaining": 0}
        progress = served.get("api/progress").json()
        assert progress["total"] == progress["done"] == 6 and progress["remaining"] == 0 and progress["complete"]
        assert progress["labels"] == 8
        assert progress["agreement"] == {"double_items": 2, "compared": 2, "agreed": 0, "rate": 0.0,
                                         "rule": "same choice", "chance": 0.25}
        assert progress["labelers"]["ann"]["labels"] + progress["labelers"]["bob"]["labels"] == 8
        records = label_app.export(served.labeling, served.paths)
    exported = validate_export(served.paths.output)
    assert exported == records and len(exported) == 6
    for record, item in zip(exported, items):
        assert {key: value for key, value in record.items() if key != "best"} == item
    for item, given in answers.items():
        assert exported[item]["best"] == given[0][1]  # the first labeler's answer
    with open(served.paths.disagreements) as f:
        disagreements = json.load(f)
    assert [entry["id"] for entry in disagreements] == sorted(double)
    assert [[a["labeler"] for a in entry["answers"]] for entry in disagreements] == \
        [[name for name, _ in answers[item]] for item in sorted(double)]


def test_undo_brings_the_item_back_and_skip_hands_it_to_someone_else(tmp_path):
    with serving(tmp_path, e_rule_items(3)) as served:
        first, wrong = answer(served, "ann", value_of=lambda task: (most_e(task["samples"]) + 1) % 4)
        undone = served.post("api/undo", {"labeler": "ann"})
        assert undone.status_code == 200 and undone.json() == {"id": first, "remaining": 3}
        again = served.get("api/task", params={"labeler": "ann"}).json()
        assert again["id"] == first
        assert served.post("api/label", {"id": first, "labeler": "ann", "best": most_e(again["samples"])}).ok
        skipped = served.get("api/task", params={"labeler": "ann"}).json()["id"]
        assert served.post("api/skip", {"id": skipped, "labeler": "ann"}).json() == {"remaining": 2}
        assert served.get("api/task", params={"labeler": "bob"}).json()["id"] == skipped  # others get it first
        assert served.get("api/task", params={"labeler": "ann"}).json()["id"] not in (first, skipped)
        events = [json.loads(line) for line in served.journal().splitlines()]
    assert [event["event"] for event in events] == ["label", "undo", "label"]
    assert events[1]["undoes"] == events[0]["seq"] and events[0]["best"] == wrong
    assert served.labeling.records()[0]["best"] == events[2]["best"] != wrong


BAD_REQUESTS = [  # (method, path, body or raw bytes, content type, status, message)
    ("post", "api/label", {"id": 99, "labeler": "ann", "best": 0}, None, 404, "unknown item 99"),
    ("post", "api/label", {"id": "0", "labeler": "ann", "best": 0}, None, 400, "'id' must be the integer id"),
    ("post", "api/label", {"id": 0, "labeler": "ann", "best": 4}, None, 400, "'best' is 4, out of range"),
    ("post", "api/label", {"id": 0, "labeler": "ann", "best": -1}, None, 400, "out of range"),
    ("post", "api/label", {"id": 0, "labeler": "ann", "best": True}, None, 400, "'best' must be an integer"),
    ("post", "api/label", {"id": 0, "labeler": "ann", "best": 1.5}, None, 400, "'best' must be an integer"),
    ("post", "api/label", {"id": 0, "labeler": "ann", "score": 3}, None, 400, "unexpected field(s) 'score'"),
    ("post", "api/label", {"id": 0, "labeler": "ann"}, None, 400, "'best' is required"),
    ("post", "api/label", {"id": 0, "best": 0}, None, 400, "'labeler' is required"),
    ("post", "api/label", {"id": 0, "labeler": "x" * 65, "best": 0}, None, 400, "'labeler' must be 1-64"),
    ("post", "api/label", {"id": 2, "labeler": "ann", "best": 0}, None, 409, "item 2 is not assigned to 'ann'"),
    ("post", "api/label", {"id": 0, "labeler": "bob", "best": 0}, None, 409, "not assigned to 'bob'"),
    ("post", "api/label", {"id": 0, "labeler": "ann", "best": 2}, None, 409, "'ann' already answered item 0"),
    ("post", "api/label", b'{"id": 0, "labeler": "ann", "best": ', "application/json", 400, "not valid JSON"),
    ("post", "api/label", b'[0, "ann", 1]', "application/json", 400, "must be a JSON object"),
    ("post", "api/label", b'{"id": 0, "labeler": "ann", "best": 0}', "text/plain", 415, "Content-Type"),
    ("post", "api/label", b'{"id": 0, "labeler": "ann", "best": 0, "pad": "' + b"x" * 20000 + b'"}',
     "application/json", 413, "Too Large"),
    ("post", "api/skip", {"id": 2, "labeler": "ann"}, None, 409, "item 2 is not assigned to 'ann'"),
    ("post", "api/undo", {"labeler": "bob"}, None, 409, "'bob' has no answer to undo"),
    ("get", "api/task", None, None, 400, "'labeler' is required"),
    ("get", "api/nonesuch", None, None, 404, "Not Found"),
    ("get", "api/label", None, None, 405, "not allowed"),
]


@pytest.mark.parametrize("method, path, body, content_type, status, message", BAD_REQUESTS,
                         ids=[f"{status}-{message[:30]}" for *_, status, message in BAD_REQUESTS])
def test_a_bad_request_gets_its_4xx_and_records_nothing(tmp_path, method, path, body, content_type, status, message):
    with serving(tmp_path, e_rule_items(3)) as served:
        assert served.get("api/task", params={"labeler": "ann"}).json()["id"] == 0  # ann holds item 0
        assert served.post("api/label", {"id": 0, "labeler": "ann", "best": 1}).ok  # an answer in the journal
        assert served.get("api/task", params={"labeler": "ann"}).json()["id"] == 1
        journal, progress = served.journal(), served.get("api/progress").json()
        if isinstance(body, bytes):
            response = requests.post(served.base + path, data=body, headers={"Content-Type": content_type}, timeout=10)
        elif method == "post":
            response = served.post(path, body)
        else:
            response = served.get(path)
        assert response.status_code == status, response.text
        assert response.headers["Content-Type"] == "application/json"
        assert message in response.json()["error"]
        assert served.journal() == journal
        assert served.get("api/progress").json() == progress


@pytest.mark.parametrize("label_type, field, good, bad", [
    ("scalar_rating", "score", [1, 7, 4.5], [0, 7.5, "7"]),
    ("scalar_compare", "difference", [-3, 3, 0, -0.5], [-4, 3.1, None]),
])
def test_scalar_labels_keep_to_their_scales(tmp_path, label_type, field, good, bad):
    kind = label_types.get(label_type)
    items = [{"query": item["query"], **dict(zip(kind.sample_fields(), [item["sample0"], item["sample1"]]))}
             for item in e_rule_items(len(good))]
    with serving(tmp_path, items, label_type) as served:
        for value in good:
            task = served.get("api/task", params={"labeler": "ann"}).json()
            assert len(task["samples"]) == kind.num_samples
            for wrong in bad:
                refused = served.post("api/label", {"id": task["id"], "labeler": "ann", field: wrong})
                assert refused.status_code == 400 and f"'{field}' must be a number" in refused.json()["error"]
            assert served.post("api/label", {"id": task["id"], "labeler": "ann", field: value}).ok
        label_app.export(served.labeling, served.paths)
    records = validate_export(served.paths.output, label_type)
    assert [record[field] for record in records] == [float(value) for value in good]
    assert all(type(record[field]) is float for record in records)


def test_a_token_is_required_on_every_request_off_loopback(tmp_path):
    options = label_app.serving_options("0.0.0.0", 0)
    assert options.token and len(options.token) >= 20  # generated: nobody serves the network without one
    with serving(tmp_path, e_rule_items(2), host="0.0.0.0") as served:
        assert "?token=" + served.token in served.page_url
        for address in {"127.0.0.1", non_loopback_address()} - {None}:
            base = served.base.replace("127.0.0.1", address)
            for headers in ({}, {"X-Label-Token": "wrong-token-123"}):
                for response in (requests.get(base, headers=headers, timeout=10),
                                 requests.get(base + "api/progress", headers=headers, timeout=10),
                                 requests.get(base + "api/task?labeler=ann", headers=headers, timeout=10),
                                 requests.post(base + "api/label", json={"id": 0, "labeler": "ann", "best": 0},
                                               headers=headers, timeout=10)):
                    assert response.status_code == 401, response.text
                    assert "token is required" in response.json()["error"]
            assert requests.get(base + "?token=" + served.token, timeout=10).status_code == 200
            assert requests.get(base + "api/progress", headers={"X-Label-Token": served.token}, timeout=10).ok
        assert served.journal() == b""
        assert served.get("api/task", params={"labeler": "ann"}).ok  # with the token, labeling works
        assert served.post("api/label", {"id": 0, "labeler": "ann", "best": 0}).ok


def non_loopback_address():
    """This machine's address on its default route, when it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if label_app.is_loopback(address) else address


def test_without_a_token_only_requests_for_localhost_are_answered(tmp_path):
    with serving(tmp_path, e_rule_items(2)) as served:
        assert served.get("api/progress").ok
        assert served.get("api/progress", headers={"Host": "localhost"}).ok
        rebound = served.get("api/progress", headers={"Host": "attacker.example:8000"})
        assert rebound.status_code == 403 and "only requests for localhost" in rebound.json()["error"]


def test_an_answer_that_cannot_be_written_is_refused_and_leaves_the_journal_whole(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with serving(tmp_path, e_rule_items(2)) as served:
        answer(served, "ann")
        journal = served.journal()
        item = served.get("api/task", params={"labeler": "ann"}).json()["id"]
        monkeypatch.setattr(os, "fsync", disk_full)
        refused = served.post("api/label", {"id": item, "labeler": "ann", "best": 1})
        assert refused.status_code == 503 and "No space left on device" in refused.json()["error"]
        assert served.journal() == journal and served.labeling.progress()["labels"] == 1
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert served.post("api/label", {"id": item, "labeler": "ann", "best": 1}).json() == {"remaining": 0}
    with open(served.paths.journal) as f:
        assert [json.loads(line)["id"] for line in f] == [0, item]


def test_one_server_per_output_and_a_torn_journal_line_is_dropped(tmp_path):
    paths = label_app.label_files(str(tmp_path / "labels.json"))
    with label_app.Journal(paths.journal) as journal:
        journal.append({"event": "label", "seq": 1, "id": 0, "labeler": "ann", "best": 2, "time": 1.0})
        with pytest.raises(ValueError, match="another labeling server is using .*labels.journal.jsonl"):
            label_app.Journal(paths.journal)
    with open(paths.journal, "ab") as f:
        f.write(b'{"event": "label", "seq": 2, "id": 1, "lab')  # a kill in the middle of an append
    with label_app.Journal(paths.journal) as journal:
        assert journal.dropped_torn_line and [event["seq"] for event in journal.events] == [1]
        journal.append({"event": "label", "seq": 2, "id": 1, "labeler": "ann", "best": 0, "time": 2.0})
    with open(paths.journal) as f:
        assert [json.loads(line)["seq"] for line in f] == [1, 2]


def test_the_server_does_not_import_tensorflow(tmp_path):
    """Only sampling needs TensorFlow: a resumed job, or the app serving items given to it, starts in a second."""
    program = f"""
import sys
from lm_human_preferences import label_app, label_types
kind = label_types.get("best_of_4")
paths = label_app.label_files({str(tmp_path / "labels.json")!r})
items = label_app.check_items({e_rule_items(2)!r}, kind)
label_set = label_app.prepare_label_set(paths, items, kind, 0.0)
with label_app.Journal(paths.journal) as journal:
    labeling = label_app.Labeling(label_set, journal)
    client = label_app.create_app(labeling, instructions="x").test_client()
    assert client.get("/api/task?labeler=ann").json["id"] == 0
    assert client.post("/api/label", json={{"id": 0, "labeler": "ann", "best": 1}}).json == {{"remaining": 1}}
assert "tensorflow" not in sys.modules, "the web app imported TensorFlow"
"""
    subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, check=True, timeout=60)


# ----- the page in a real browser ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, driven by Playwright (Playwright's own browser download is not used)."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("SKIPPED THE BROWSER TESTS OF THE LABELING WEB APP: Chromium is not installed "
                    "(apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("SKIPPED THE BROWSER TESTS OF THE LABELING WEB APP: Playwright is not installed "
                    "(pip install -e '.[test]')")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, url, name, dialogs):
    page = browser.new_context().new_page()
    page.set_default_timeout(15000)
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url)
    page.fill("#labeler", name)
    page.press("#labeler", "Enter")
    page.wait_for_selector("#task:not([hidden])")
    return page


def item_on_screen(page) -> str:
    return page.locator("#task").get_attribute("data-item") or ""


def wait_for_item_change(page, shown):
    page.wait_for_function("shown => document.getElementById('task').dataset.item !== shown", arg=shown)


def test_model_text_is_shown_as_text_never_run(tmp_path, browser):
    main = encodings.get("main").get_encoder()
    query = "A query with <b>markup</b>\nand a second line"
    samples = ["<script>alert(1)</script>", '<img src=x onerror="alert(2)">', "plain", "'); alert(3); //"]
    items = [{"query": main.encode(query), **{f"sample{n}": main.encode(text) for n, text in enumerate(samples)}}]
    dialogs = []
    with serving(tmp_path, items, encoder=main, instructions="Read <i>carefully</i>.") as served:
        page = open_page(browser, served.page_url, "ann", dialogs)
        assert page.locator("#context").text_content() == query  # the newline is kept (shown with pre-wrap)
        assert page.locator("#samples .sample .text").all_text_contents() == samples
        assert page.get_by_text("<script>alert(1)</script>").is_visible()
        assert page.locator("#instructions").text_content() == "Read <i>carefully</i>."
        assert page.locator("#samples img, #samples script, #context b, #instructions i").count() == 0
        page.wait_for_timeout(300)  # time for an injected script or onerror handler to fire
        page.context.close()
    assert dialogs == []


def test_two_labelers_label_best_of_4_in_the_browser_and_the_export_trains_a_reward_model(tmp_path, browser):
    # Playwright is installed: the browser fixture ran
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    items = e_rule_items(8, seed=1)
    output = str(tmp_path / "labels.json")
    announced, result = queue.Queue(), {}

    def collect():
        result["records"] = label_app.collect_labels(items, "best_of_4", output, port=0, overlap=0.25,
                                                     encoder=ENCODER, announce=announced.put)

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    url = re.search(r"open (http://\S+)", announced.get(timeout=30)).group(1)
    dialogs, progress_lines = [], []
    ann = open_page(browser, url, "ann", dialogs)  # labels with the keyboard
    bob = open_page(browser, url, "bob", dialogs)  # labels with the mouse

    # ann first presses a wrong number, then takes it back with U: the item comes back and she answers again
    shown = item_on_screen(ann)
    wrong = (most_e(ann.locator("#samples .sample .text").all_text_contents()) + 1) % 4
    ann.keyboard.press(str(wrong + 1))
    wait_for_item_change(ann, shown)
    ann.keyboard.press("u")
    ann.wait_for_function("shown => document.getElementById('task').dataset.item === shown", arg=shown)
    # bob skips his first item with the button
    skipped = item_on_screen(bob)
    bob.click("#skip")
    wait_for_item_change(bob, skipped)

    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        for page, uses_keyboard in ((ann, True), (bob, False)):
            shown = item_on_screen(page)
            if not shown or not page.locator("#samples .sample").first.is_enabled():
                continue  # waiting for an item, or an answer on its way
            best = most_e(page.locator("#samples .sample .text").all_text_contents())
            if uses_keyboard:
                page.keyboard.press(str(best + 1))
            else:
                page.locator("#samples .sample").nth(best).click()
            with contextlib.suppress(PlaywrightTimeout):  # after the last answer the server may have stopped
                wait_for_item_change(page, shown)
            progress_lines.append(page.locator("#progress").text_content())
        time.sleep(0.05)
    thread.join(timeout=10)
    assert not thread.is_alive(), "labeling did not finish"
    assert dialogs == []
    assert any(re.search(r"\d+ / 8 items done · you: \d+ labels, [\d.]+ per hour", line) for line in progress_lines)
    assert any("agreement: 100% of" in line and "(chance 25%)" in line for line in progress_lines), progress_lines

    records = validate_export(output)
    assert records == result["records"] and len(records) == 8
    for record in records:  # every answer follows the rule, including ann's corrected one
        assert record["best"] == most_e([ENCODER.decode(record[f"sample{n}"]) for n in range(4)])
    with open(label_app.label_files(output).journal) as f:
        events = [json.loads(line) for line in f]
    labels = [event for event in events if event["event"] == "label"]
    assert {event["labeler"] for event in labels} == {"ann", "bob"}
    assert len(labels) == 8 + 2 + 1  # 2 double items, and ann's undone answer
    assert [event["event"] for event in events].count("undo") == 1
    with open(label_app.label_files(output).disagreements) as f:
        assert json.load(f) == []

    # the export is a label file that reward training takes as it is
    hparams = experiments.resolve_hparams("train_reward", "test", "from_people", save_dir=str(tmp_path / "runs"),
                                          overrides={"labels.source": output, "labels.num_train": 8,
                                                  "normalize_before": False, "normalize_after": False})
    with tf.Graph().as_default():
        train_reward.train(hparams)
    assert os.path.exists(os.path.join(hparams.run.save_dir, "reward_model", "checkpoints", "model.ckpt.index"))


@pytest.mark.parametrize("label_type, field, keys, expected", [
    ("scalar_rating", "score", ["7", "1"], [7.0, 1.0]),
    ("scalar_compare", "difference", ["1", "7"], [-3.0, 3.0]),  # 1: left much better; 7: right much better
])
def test_scalar_scales_in_the_browser(tmp_path, browser, label_type, field, keys, expected):
    kind = label_types.get(label_type)
    items = [{"query": item["query"], **dict(zip(kind.sample_fields(), [item["sample0"], item["sample1"]]))}
             for item in e_rule_items(3)]
    with serving(tmp_path, items, label_type) as served:
        page = open_page(browser, served.page_url, "ann", [])
        assert page.locator("#samples .sample").count() == kind.num_samples
        assert page.locator("#scale button").count() == 7
        for key in keys:
            shown = item_on_screen(page)
            page.keyboard.press(key)
            wait_for_item_change(page, shown)
        shown = item_on_screen(page)
        page.locator("#scale button").nth(3).click()  # the middle: 4, or "about the same"
        wait_for_item_change(page, shown)
        page.wait_for_selector("#message:has-text('All items are labeled')")
        page.context.close()
        values = [record[field] for record in served.labeling.records()]
    assert values == expected + [4.0 if field == "score" else 0.0]


# ----- the command: kill -9 and resume -----------------------------------------------------------------------------

class LabelCommand:
    """`./launch.py label test OUTPUT --judge human --port 0 ...` as a subprocess; `url` once it serves."""

    def __init__(self, output, *flags):
        self.log = output + f".stderr-{time.monotonic_ns()}.log"  # TensorFlow's chatter, for failure messages
        # Started with SIGINT ignored, as a shell script's `cmd &` (or a CI runner) starts it: Python then sets no
        # Ctrl-C handler of its own, and the command must still export on SIGINT (it once hung in such a CI run).
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            with open(self.log, "w") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "launch.py", "label", "test", output, "--count", "6", "--judge", "human",
                     "--port", "0", *flags], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()
        self.output = []
        self.url = re.search(r"open (http://\S+)", self.wait_for("open http://")).group(1)

    def wait_for(self, text, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.output.append(line)
            if text in line:
                return line
        with open(self.log) as log:
            raise AssertionError(f"{text!r} never printed; output: {''.join(self.output)}\nstderr: {log.read()}")

    def label(self, name="ann"):
        task = requests.get(self.url + "api/task", params={"labeler": name}, timeout=10)
        assert task.status_code == 200, task.text
        item = task.json()["id"]
        response = requests.post(self.url + "api/label", json={"id": item, "labeler": name, "best": item % 4},
                                 timeout=10)
        assert response.status_code == 200, response.text
        return item


def json_in_page(html):
    """The page's configuration (instructions, scales), embedded as JSON."""
    return json.loads(re.search(r'<script id="config" type="application/json">(.*?)</script>', html, re.S).group(1))


def test_instructions_follow_the_papers_tasks():
    assert "positive" in label_app.default_instructions("sentiment")
    assert "vividly descriptive" in label_app.default_instructions("descriptiveness")
    assert label_app.default_instructions("tldr") == label_app.default_instructions("cnndm")
    assert "accurate" in label_app.default_instructions("tldr")
    assert label_app.default_instructions("test") == label_app.default_instructions("demo") == \
        label_app.GENERIC_INSTRUCTIONS


def test_killed_with_sigkill_the_same_command_resumes_and_every_acknowledged_label_is_kept_once(tmp_path):
    output = str(tmp_path / "people.json")
    paths = label_app.label_files(output)
    first = LabelCommand(output)
    with open(paths.items, "rb") as f:
        items_file = f.read()
    before_kill = [first.label() for _ in range(3)]
    assert requests.get(first.url + "api/task", params={"labeler": "ann"}, timeout=10).ok  # in flight, unanswered
    first.process.send_signal(signal.SIGKILL)
    assert first.process.wait(timeout=30) == -signal.SIGKILL
    assert not os.path.exists(output)  # nothing exported: the journal holds the labels
    with open(paths.journal, "ab") as f:
        f.write(b'{"event": "label", "seq": 4, "id": 3, "lab')  # an answer cut off by the kill

    second = LabelCommand(output)  # the same command: resumes from the journal, samples nothing again
    assert "resuming with 3 of 6 labelled" in second.output[-1]
    assert any("dropped an incomplete last line" in line for line in second.output)
    with open(paths.items, "rb") as f:
        assert f.read() == items_file
    assert requests.get(second.url + "api/progress", timeout=10).json()["labeled"] == 3
    assert label_app.GENERIC_INSTRUCTIONS in json_in_page(requests.get(second.url, timeout=10).text)["instructions"]
    after = [second.label()]
    second.process.send_signal(signal.SIGINT)  # Ctrl-C: what is done so far is exported
    second.wait_for("interrupted: wrote the 4 labels so far")
    assert second.process.wait(timeout=30) == 130
    assert [record["best"] for record in validate_export(output)] == [item % 4 for item in sorted(before_kill + after)]

    instructions = tmp_path / "instructions.txt"
    instructions.write_text("Prefer samples with many e's.\nIgnore the rest.")
    third = LabelCommand(output, "--instructions", str(instructions))  # serving flags may change on resume
    assert json_in_page(requests.get(third.url, timeout=10).text)["instructions"] == instructions.read_text()
    after += [third.label() for _ in range(2)]
    third.wait_for("all 6 items labelled: wrote 6 labels")
    assert third.process.wait(timeout=30) == 0
    records = validate_export(output)
    assert sorted(before_kill + after) == list(range(6))
    assert [record["best"] for record in records] == [item % 4 for item in range(6)]
    with open(paths.journal) as f:
        labelled = [json.loads(line)["id"] for line in f]
    assert sorted(labelled) == list(range(6))  # each answer exactly once


def test_sigterm_exports_the_labels_so_far_like_ctrl_c(tmp_path):
    """`kill` (a scheduler, a shutdown) stops the command as Ctrl-C does: exported labels, status 130."""
    output = str(tmp_path / "people.json")
    command = LabelCommand(output)
    labelled = command.label()
    command.process.send_signal(signal.SIGTERM)
    command.wait_for("interrupted: wrote the 1 labels so far")
    assert command.process.wait(timeout=30) == 130
    assert [record["best"] for record in validate_export(output)] == [labelled % 4]


# ----- the command's flags -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--count", "0"], "--count: got '0', expected a positive number of labels"),
    (["--overlap", "1.5"], "--overlap: got '1.5', expected a fraction of items in [0, 1]"),
    (["--overlap", "-0.1"], "--overlap: got '-0.1'"),
    (["--instructions", "/no/such/instructions.txt"], "--instructions: no such file '/no/such/instructions.txt'"),
    (["--port", "70000"], "--port: got '70000', expected a TCP port 0..65535"),
    (["--token", "short"], "--token: expected at least 8 characters"),
    (["--temperature", "0.1"], "--temperature is a synthetic judge's noise"),
    (["--judge", "letter_e", "--port", "8001"], "--port applies only to --judge human"),
    (["--judge", "people"], "unknown judge 'people'; known judges: letter_X: "),
    (["--judge", "letter_e", "--policy", "/no/such/run"], "--policy /no/such/run: no saved policy there"),
])
def test_bad_flags_give_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    judge = [] if "--judge" in flags else ["--judge", "human"]
    argv = ["label", "test", str(tmp_path / "labels.json"), "--count", "4", *judge, *flags]
    error = cli_error(capsys, *argv)
    assert message in error, error
    assert os.listdir(tmp_path) == []


def test_a_busy_port_or_another_jobs_files_are_refused_before_sampling(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        error = cli_error(capsys, "label", "test", str(tmp_path / "a.json"), "--count", "2", "--judge", "human",
                          "--port", port)
    assert f"cannot serve on 127.0.0.1:{port}" in error and "choose another --port" in error
    # an items file of another command (here 2 items, where 4 are asked for) is never mixed into this job
    kind = label_types.get("best_of_4")
    paths = label_app.label_files(str(tmp_path / "b.json"))
    made_by = {"command": "label", "experiment": "test", "count": 2, "label_type": None, "seed": 0, "policy": None,
               "overrides": {}}
    label_app.prepare_label_set(paths, e_rule_items(2), kind, 0.0, ENCODER, made_by)
    error = cli_error(capsys, "label", "test", paths.output, "--count", "4", "--judge", "human", "--port", "0")
    assert "holds the items of a different labeling command (count 2 -> 4)" in error
    with open(tmp_path / "c.json", "w") as f:
        f.write("[]\n")
    error = cli_error(capsys, "label", "test", str(tmp_path / "c.json"), "--count", "2", "--judge", "human",
                      "--port", "0")
    assert "c.json exists and is not the output of an unfinished labeling job" in error
    assert sorted(os.listdir(tmp_path)) == ["b.items.json", "c.json"]


def test_label_command_samples_a_saved_policy(tmp_path):
    """--policy SAVE_DIR: the records hold that policy's samples (one that always says "z"), not the initial
    policy's."""
    model = TrainedModel("test")
    z = ENCODER.encode("z")[0]
    with tf.Graph().as_default():
        policy = Policy(model, scope="policy")
        variables = {variable.op.name: variable for variable in policy.get_params()}
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            n_embd = model.hparams().n_embd
            # the final layer norm outputs a constant vector, whose logit is by far the largest for "z"
            variables["policy/model/ln_f/g"].load(np.zeros(n_embd), sess)
            variables["policy/model/ln_f/b"].load(np.ones(n_embd), sess)
            embedding = sess.run(variables["policy/model/wte"])
            embedding[z] = 10.0
            variables["policy/model/wte"].load(embedding, sess)
            saver = tf.train.Saver(policy.get_params(), save_relative_paths=True)
            save_model(sess, saver, str(tmp_path / "run" / "policy"), model.hparams(), "test", step=1)
    output = tmp_path / "labels.json"
    labeler.label_command("test", str(output), count=5, judge="letter_z", policy=str(tmp_path / "run"))
    records = validate_export(output)
    assert len(records) == 5
    assert all(record[f"sample{n}"] == [z] * RESPONSE_LENGTH for record in records for n in range(4))
