"""File layer against a real HTTP server on 127.0.0.1: cache layout and reuse, retries, truncated bodies,
fail-fast errors, files read together listed when missing, the download progress on a pseudo-terminal and in a
log, atomic writes, and the once-per-machine download under MPI; gs:// save directories against a local Cloud
Storage emulator: round trip of a checkpoint, upload order, changed files only, deletions, staging."""

import collections
import contextlib
import fcntl
import hashlib
import http.server
import json
import locale
import os
import pty
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import types
import urllib.parse

import numpy as np
import pytest
import requests
import tensorflow as tf
from google.cloud import storage

from lm_human_preferences.utils import files

from mpi_programs import REPO_ROOT, rank_lines, run


class FileServer:
    """Serves `files`; `fail_503[path]` answers 503 that many times first; `truncate[path]` sends the
    Content-Length of the whole file but closes after half of it, that many times; `rate[path]` sends the body
    at about that many bytes per second; `custom[path](handler)` answers as it likes. Counts requests and keeps
    the headers of each path's last request."""

    PIECE_BYTES = 1 << 16  # a throttled body goes out in pieces of this size

    def __init__(self):
        self.files = {}
        self.fail_503 = collections.Counter()
        self.truncate = collections.Counter()
        self.rate = {}
        self.custom = {}  # path -> function(handler) that answers the request itself
        self.headers = {}  # path -> the headers of its last request
        self.requests = collections.Counter()  # (method, path) -> count
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.respond(send_body=True)

            def do_HEAD(self):
                self.respond(send_body=False)

            def respond(self, send_body):
                with server.lock:
                    server.requests[self.command, self.path] += 1
                    fail = server.fail_503[self.path] > 0
                    truncate = not fail and server.truncate[self.path] > 0
                    if fail:
                        server.fail_503[self.path] -= 1
                    elif truncate:
                        server.truncate[self.path] -= 1
                    server.headers[self.path] = dict(self.headers)
                if self.path in server.custom:
                    server.custom[self.path](self)
                    return
                body = server.files.get(self.path)
                if fail:
                    self.send_error(503)
                elif body is None:
                    self.send_error(404)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if send_body:
                        body = body[: len(body) // 2] if truncate else body
                        rate = server.rate.get(self.path)
                        for start in range(0, len(body), server.PIECE_BYTES if rate else max(len(body), 1)):
                            piece = body[start:start + (server.PIECE_BYTES if rate else len(body))]
                            self.wfile.write(piece)
                            self.wfile.flush()
                            if rate:
                                time.sleep(len(piece) / rate)
                        self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def host(self):
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path):
        return f"http://{self.host}{path}"

    def gets(self, path):
        with self.lock:
            return self.requests["GET", path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory; fast retries (2 retries, millisecond backoff)."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("LMHP_CACHE_DIR", str(directory))
    monkeypatch.setattr(files, "RETRIES", 2)
    monkeypatch.setattr(files, "BACKOFF_SECONDS", 0.001)
    return directory


def leftovers(directory):
    """Temporary download files left anywhere under `directory`."""
    return [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names if f.endswith(".part")]


# ----- paths ----------------------------------------------------------------------------------------------

def test_paths_and_urls(cache):
    assert files.is_remote("https://a/b") and files.is_remote("gs://bucket/x") and files.is_remote("HTTP://a/b")
    assert not files.is_remote("/tmp/x") and not files.is_remote("relative/dir")
    assert files.join("https://h/models/", "124M", "hparams.json") == "https://h/models/124M/hparams.json"
    assert files.join("gs://b/run", "/reward_model/") == "gs://b/run/reward_model/"
    assert files.join("/tmp/run", "policy", "encoding") == os.path.join("/tmp/run", "policy", "encoding")
    assert files.cache_dir() == str(cache)
    assert files.cache_path("gs://bucket/a/b%20c.json") == os.path.join(str(cache), "gs", "bucket", "a", "b c.json")
    with_query = files.cache_path("https://h:8080/a/f.bin?sig=1")
    assert os.path.dirname(with_query) == os.path.join(str(cache), "https", "h_8080", "a")
    assert with_query != files.cache_path("https://h:8080/a/f.bin?sig=2")
    for bad in ["https://h/dir/", "https://h/a/../../etc/passwd", "https://h/a%2F..%2F..%2Fx", "gs://bucket"]:
        with pytest.raises(ValueError, match="not"):
            files.cache_path(bad)


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("LMHP_CACHE_DIR", raising=False)
    assert files.cache_dir() == os.path.expanduser("~/.cache/lm-human-preferences")


def test_local_paths_pass_through(tmp_path):
    path = tmp_path / "hparams.json"
    path.write_text('{"n_vocab": 27}')
    assert files.local_path(str(path)) == str(path)
    assert files.read_json(path) == {"n_vocab": 27}
    assert files.exists(str(path)) and not files.exists(str(tmp_path / "missing"))


# ----- downloads ------------------------------------------------------------------------------------------

def test_download_keeps_remote_layout_and_second_call_uses_the_cache(server, cache):
    server.files["/run/ckpt/model.ckpt.index"] = b"index bytes"
    server.files["/run/ckpt/model.ckpt.data-00000-of-00001"] = b"\x00\x01" * 5000
    server.files["/run/hparams.json"] = json.dumps({"n_layer": 2}).encode()
    index = files.local_path(server.url("/run/ckpt/model.ckpt.index"))
    data = files.local_path(server.url("/run/ckpt/model.ckpt.data-00000-of-00001"))

    host_dir = cache / "http" / server.host.replace(":", "_")
    assert index == str(host_dir / "run" / "ckpt" / "model.ckpt.index")
    assert os.path.dirname(index) == os.path.dirname(data)  # siblings stay siblings
    assert open(data, "rb").read() == b"\x00\x01" * 5000
    assert files.read_json(server.url("/run/hparams.json")) == {"n_layer": 2}
    assert leftovers(cache) == []

    assert files.local_path(server.url("/run/ckpt/model.ckpt.index")) == index
    assert files.read_text(server.url("/run/hparams.json")) == '{"n_layer": 2}'
    assert files.exists(server.url("/run/hparams.json"))
    assert server.gets("/run/ckpt/model.ckpt.index") == 1
    assert server.gets("/run/hparams.json") == 1
    assert sum(server.requests.values()) == 3  # nothing but the three first downloads (no HEAD either)


def test_a_download_says_what_it_fetched_and_where_in_one_line_on_stderr(server, cache, capfd):
    server.files["/run/hparams.json"] = b"{}"
    target = files.local_path(server.url("/run/hparams.json"))
    out, err = capfd.readouterr()
    assert re.fullmatch(rf"downloaded {re.escape(server.url('/run/hparams.json'))} -> {re.escape(target)} "
                        rf"\(2 B in \d+\.\ds, [\d.]+ (k|M)?B/s\)\n", err), err
    assert out == ""  # stdout stays for the program's results
    files.local_path(server.url("/run/hparams.json"))
    assert capfd.readouterr().err == ""  # a cached file is not fetched again


@pytest.mark.parametrize("value, expected", [(None, 5), ("", 5), ("7", 7)])
def test_numbers_from_the_environment_fall_back_to_their_default(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("LMHP_TEST_NUMBER", raising=False)
    else:
        monkeypatch.setenv("LMHP_TEST_NUMBER", value)
    assert files._env_number("LMHP_TEST_NUMBER", 5, int) == expected


def test_a_number_from_the_environment_that_does_not_parse_is_named(monkeypatch):
    monkeypatch.setenv("LMHP_TEST_NUMBER", "five")
    with pytest.raises(ValueError, match=r"^\$LMHP_TEST_NUMBER='five' is not a valid float$"):
        files._env_number("LMHP_TEST_NUMBER", 1.0, float)


def test_cached_file_is_used_without_the_network(cache):
    url = "https://unreachable.invalid/models/x/hparams.json"
    target = files.cache_path(url)
    os.makedirs(os.path.dirname(target))
    with open(target, "w") as f:
        f.write("cached")
    assert files.read_text(url) == "cached"
    assert files.exists(url)


def test_exists_asks_the_server_without_downloading(server, cache):
    server.files["/a.txt"] = b"a"
    assert files.exists(server.url("/a.txt"))
    assert not files.exists(server.url("/missing.txt"))
    assert server.requests["HEAD", "/a.txt"] == 1 and server.gets("/a.txt") == 0
    assert not os.path.exists(files.cache_path(server.url("/a.txt")))


def test_transient_503_is_retried(server, cache):
    server.files["/flaky.json"] = b"[1, 2]"
    server.fail_503["/flaky.json"] = 2
    assert files.read_json(server.url("/flaky.json")) == [1, 2]
    assert server.gets("/flaky.json") == 3


def test_persistent_503_gives_up_after_the_retries(server, cache):
    server.files["/down.json"] = b"[]"
    server.fail_503["/down.json"] = 100
    url = server.url("/down.json")
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    message = str(info.value)
    assert url in message and "HTTP 503" in message and "3 attempts" in message
    assert files.cache_path(url) in message
    assert server.gets("/down.json") == 3  # RETRIES=2 -> three attempts
    assert not os.path.exists(files.cache_path(url))


def test_truncated_body_never_leaves_a_cache_entry(server, cache):
    body = bytes(range(256)) * 400
    server.files["/model.ckpt.data"] = body
    server.truncate["/model.ckpt.data"] = 100
    url = server.url("/model.ckpt.data")
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    message = str(info.value)
    assert url in message and files.cache_path(url) in message
    assert "interrupted" in message or "truncated" in message
    assert not os.path.exists(files.cache_path(url))
    assert leftovers(cache) == []

    # A truncated transfer is transient: once the server recovers, the retried download is whole.
    server.truncate["/model.ckpt.data"] = 1
    with open(files.local_path(url), "rb") as f:
        assert f.read() == body


def test_404_fails_at_once_naming_url_status_and_cache_path(server, cache, monkeypatch):
    monkeypatch.setattr(files, "BACKOFF_SECONDS", 30.0)  # a retry would show as a 30 s wait
    url = server.url("/datasets/book_passages/train.jsonl")
    start = time.time()
    with pytest.raises(files.FileFetchError) as info:
        files.read_text(url)
    assert time.time() - start < 5
    message = str(info.value)
    assert url in message and "HTTP 404" in message and files.cache_path(url) in message
    assert info.value.status == 404 and info.value.url == url
    assert server.gets("/datasets/book_passages/train.jsonl") == 1


def test_unreachable_host_fails_fast(cache, monkeypatch):
    monkeypatch.setattr(files, "BACKOFF_SECONDS", 30.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/gpt-2/models/124M/checkpoint"
    start = time.time()
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    assert time.time() - start < 5
    message = str(info.value)
    assert url in message and files.cache_path(url) in message and "unreachable" in message
    # the cause itself, not urllib3's retry wrapper around it ("Max retries exceeded ... Caused by ...")
    assert re.fullmatch(rf"could not fetch {re.escape(url)}: host unreachable \(offline\?\): HTTPConnection\(host="
                        rf"'127\.0\.0\.1', port={port}\): Failed to establish a new connection: \[Errno 111\] "
                        rf"Connection refused; cache path {re.escape(files.cache_path(url))}", message), message
    with pytest.raises(files.FileFetchError, match="unreachable"):
        files.exists(url)


# ----- http(s) error paths: which failures are retried, how long it waits, what the error says ------------

class Clock:
    """Stands in for files.time and files.random: records the waits between attempts instead of sleeping, and
    draws the jitter factor `jitter` (random.uniform(0.5, 1.5) otherwise)."""

    def __init__(self, monkeypatch, jitter=1.5):
        self.waits = []
        self.jitter_range = []
        monkeypatch.setattr(files, "time", types.SimpleNamespace(sleep=self.waits.append, monotonic=time.monotonic))
        monkeypatch.setattr(files, "random", types.SimpleNamespace(uniform=self.uniform))
        self.jitter = jitter

    def uniform(self, low, high):
        self.jitter_range.append((low, high))
        return self.jitter


def answer(status, headers=(), body=b""):
    """A custom answer: `status` with `headers` and `body` (Content-Length added)."""
    def respond(handler):
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command == "GET":
            handler.wfile.write(body)
    return respond


def test_retries_wait_with_exponential_backoff_and_jitter_and_say_so(server, cache, monkeypatch, capfd):
    clock = Clock(monkeypatch)
    monkeypatch.setattr(files, "BACKOFF_SECONDS", 2.0)
    monkeypatch.setattr(files, "RETRIES", 3)
    server.files["/flaky.json"] = b"[]"
    server.fail_503["/flaky.json"] = 3
    url = server.url("/flaky.json")
    assert files.read_json(url) == []
    assert clock.waits == [3.0, 6.0, 12.0]  # 2 s x 2**attempt x the jitter factor drawn (1.5)
    assert clock.jitter_range == [(0.5, 1.5)] * 3
    lines = capfd.readouterr().err.splitlines()
    assert lines[:3] == [f"fetch {url} failed (HTTP 503 Service Unavailable); retry {n} of 3 in {wait:.1f}s"
                         for n, wait in [(1, 3.0), (2, 6.0), (3, 12.0)]]
    assert lines[3].startswith(f"downloaded {url} -> ") and len(lines) == 4


def test_a_wait_honours_retry_after_and_is_capped(server, cache, monkeypatch):
    clock = Clock(monkeypatch, jitter=1.0)
    monkeypatch.setattr(files, "BACKOFF_SECONDS", 1.0)
    monkeypatch.setattr(files, "RETRIES", 3)
    monkeypatch.setattr(files, "MAX_BACKOFF_SECONDS", 10.0)
    answers = iter([answer(429, [("Retry-After", "7")]), answer(429, [("Retry-After", "120")]),
                    answer(503, [("Retry-After", "soon")]), answer(200, body=b"ok")])
    server.custom["/busy"] = lambda handler: next(answers)(handler)
    assert files.read_text(server.url("/busy")) == "ok"
    # Retry-After 7 s beats the 1 s backoff; 120 s is capped at 10; an unreadable one is ignored (4 s backoff)
    assert clock.waits == [7.0, 10.0, 4.0]


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_these_statuses_are_transient_and_retried(server, cache, monkeypatch, status):
    Clock(monkeypatch)
    answers = iter([answer(status), answer(200, body=b"x")])
    server.custom["/f"] = lambda handler: next(answers)(handler)
    assert files.read_text(server.url("/f")) == "x" and server.gets("/f") == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
def test_other_4xx_fail_at_once_with_their_status(server, cache, monkeypatch, status):
    clock = Clock(monkeypatch)
    server.custom["/f"] = answer(status)
    url = server.url("/f")
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    reason = http.server.BaseHTTPRequestHandler.responses[status][0]
    assert str(info.value) == f"could not fetch {url}: HTTP {status} {reason} (not retried); cache path " \
                              f"{files.cache_path(url)}"
    assert (info.value.status, info.value.url, info.value.cache_path) == (status, url, files.cache_path(url))
    assert server.gets("/f") == 1 and clock.waits == []
    assert not os.path.exists(files.cache_path(url)) and leftovers(cache) == []
    if status == 404:
        assert not files.exists(url)
    else:
        with pytest.raises(files.FileFetchError) as info:
            files.exists(url)
        assert str(info.value) == f"could not check whether {url} exists: HTTP {status} {reason} (not retried); " \
                                  f"cache path {files.cache_path(url)}"
        assert info.value.status == status


def test_no_retries_when_the_setting_is_zero_or_negative(server, cache, monkeypatch):
    clock = Clock(monkeypatch)
    server.files["/down"] = b"x"
    server.fail_503["/down"] = 100
    for retries, attempts in [(0, 1), (-3, 1), (1, 2)]:
        monkeypatch.setattr(files, "RETRIES", retries)
        before = server.gets("/down")
        with pytest.raises(files.FileFetchError) as info:
            files.local_path(server.url("/down"))
        assert server.gets("/down") - before == attempts
        noun = "attempt" if attempts == 1 else "attempts"
        assert str(info.value) == (f"could not fetch {server.url('/down')} after {attempts} {noun}, last error: "
                                   f"HTTP 503 Service Unavailable; cache path {files.cache_path(server.url('/down'))}")
        assert info.value.status is None
    assert clock.waits == [pytest.approx(0.0015)]  # the one wait, of the run with one retry


def test_a_server_that_hangs_up_or_goes_silent_is_retried(server, cache, monkeypatch):
    Clock(monkeypatch)
    monkeypatch.setattr(files, "READ_TIMEOUT_SECONDS", 0.3)

    def hang_up(handler):
        handler.close_connection = True  # no answer at all

    def silent(handler):
        time.sleep(1.0)  # past the read timeout before any answer

    def stall(handler):  # headers and part of the body, then silence
        handler.send_response(200)
        handler.send_header("Content-Length", "200000")
        handler.end_headers()
        handler.wfile.write(b"x" * 100_000)
        handler.wfile.flush()
        time.sleep(1.0)

    # the body is read 64 KiB at a time: the stalled one fails in its second piece
    for path, behaviour, expected in [("/hang-up", hang_up, "connection error: "), ("/silent", silent, "timeout: "),
                                      ("/stall", stall, "transfer interrupted after 65536 bytes: ")]:
        server.custom[path] = behaviour
        url = server.url(path)
        with pytest.raises(files.FileFetchError) as info:
            files.local_path(url)
        message = str(info.value)
        assert message.startswith(f"could not fetch {url} after 3 attempts, last error: {expected}"), message
        assert message.endswith(f"; cache path {files.cache_path(url)}")
        assert (info.value.url, info.value.cache_path) == (url, files.cache_path(url))
        if path == "/stall":  # the reason is urllib3's message, not its connection pool's name
            assert message.endswith(f"Read timed out.; cache path {files.cache_path(url)}"), message
        assert server.gets(path) == 3
        assert not os.path.exists(files.cache_path(url)) and leftovers(cache) == []


def test_a_host_that_never_accepts_the_connection_fails_at_once(cache, monkeypatch):
    clock = Clock(monkeypatch)
    monkeypatch.setattr(files, "CONNECT_TIMEOUT_SECONDS", 0.3)
    with socket.socket() as listener:  # listens, but its queue is full: connection attempts time out
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/gpt-2/models/124M/hparams.json"
        with pytest.raises(files.FileFetchError) as info:
            files.local_path(url)
        for filler in fillers:
            filler.close()
    assert str(info.value) == (f"could not fetch {url}: host unreachable: no connection within 0.3s (offline?); "
                               f"cache path {files.cache_path(url)}")
    assert clock.waits == []


def test_redirects_are_followed_and_an_endless_one_fails_at_once(server, cache, monkeypatch):
    clock = Clock(monkeypatch)
    server.files["/new/place.json"] = b"[1]"
    server.custom["/old/place.json"] = answer(302, [("Location", "/new/place.json")])
    assert files.read_json(server.url("/old/place.json")) == [1]
    assert os.path.isfile(files.cache_path(server.url("/old/place.json")))  # cached under the URL asked for
    server.custom["/loop"] = answer(302, [("Location", "/loop")])
    with pytest.raises(files.FileFetchError, match=r"^could not fetch http://.*/loop: TooManyRedirects: Exceeded "
                                                   r"\d+ redirects.*; cache path "):
        files.local_path(server.url("/loop"))
    assert server.gets("/loop") > 1 and clock.waits == []  # followed, but never retried


def test_a_url_requests_cannot_use_is_a_permanent_error(cache):
    url = "http://127.0.0.1:notaport/a.json"
    with pytest.raises(files.FileFetchError, match=r"^could not fetch http://127.0.0.1:notaport/a.json: InvalidURL: "):
        files.local_path(url)


def test_the_file_is_asked_for_unencoded_and_a_body_without_length_is_taken_whole(server, cache):
    body = b"no length " * 5000

    def chunked(handler):  # HTTP/1.1 chunked transfer: no Content-Length, so no size to check or show
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for start in range(0, len(body), 7000):
            piece = body[start:start + 7000]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True

    server.custom["/chunked.txt"] = chunked
    assert files.read_text(server.url("/chunked.txt")) == body.decode()
    assert server.headers["/chunked.txt"]["Accept-Encoding"] == "identity"


def test_a_gzip_encoded_answer_is_stored_as_sent_without_a_length_check(server, cache):
    import gzip
    compressed = gzip.compress(b"[1, 2, 3]")
    # a Content-Length that does not match: it is not checked for an encoded body, whose bytes are kept as they are
    server.custom["/enc.json"] = answer(200, [("Content-Encoding", "gzip")], compressed)
    with open(files.local_path(server.url("/enc.json")), "rb") as f:
        assert f.read() == compressed


def chunked_answer(body, header=b""):
    """A custom answer: `body` in HTTP/1.1 chunked transfer (no Content-Length unless `header` adds one)."""
    def respond(handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + header +
                            b"Connection: close\r\n\r\n")
        for start in range(0, len(body), 7000):
            piece = body[start:start + 7000]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True
    return respond


def test_a_body_shorter_than_its_content_length_is_never_cached_even_when_chunked(server, cache, monkeypatch):
    Clock(monkeypatch)
    # chunked framing (which urllib3 follows, ignoring the length) and a Content-Length the body does not keep
    server.custom["/short.bin"] = chunked_answer(b"y" * 30000, header=b"Content-Length: 50000\r\n")
    url = server.url("/short.bin")
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    assert str(info.value) == (f"could not fetch {url} after 3 attempts, last error: truncated body: got 30000 of "
                               f"50000 bytes; cache path {files.cache_path(url)}")
    assert not os.path.exists(files.cache_path(url)) and leftovers(cache) == []


def test_on_a_terminal_a_download_of_unknown_size_shows_its_bytes_and_rate_only(server, cache, monkeypatch):
    import gzip
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    server.custom["/chunked.bin"] = chunked_answer(b"x" * 20000)  # no Content-Length
    # a Content-Length, but of the encoded bytes, which are what is stored: not taken as the size
    server.custom["/encoded.bin"] = answer(200, [("Content-Encoding", "gzip")], gzip.compress(b"x" * 20000))
    terminal = Terminal()
    with open(terminal.slave, "w", closefd=False) as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        files.local_path(server.url("/chunked.bin"))
        files.local_path(server.url("/encoded.bin"))
        monkeypatch.undo()
    output = terminal.output()
    assert "chunked.bin: 0.00B, ?B/s" in output and "encoded.bin: 0.00B, ?B/s" in output, output
    assert "%" not in output and "left" not in output, output


def test_a_failed_download_on_a_terminal_clears_its_bar_and_reports_nothing(server, cache, monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(files, "RETRIES", 0)
    server.files["/part.bin"] = bytes(range(256)) * 4000
    server.rate["/part.bin"] = 4 * RATE
    server.truncate["/part.bin"] = 1
    terminal = Terminal()
    with open(terminal.slave, "w", closefd=False) as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        with pytest.raises(files.FileFetchError, match=r" after 1 attempt, last error: transfer interrupted after "
                                                       r"512000 bytes: Connection broken: IncompleteRead"):
            files.local_path(server.url("/part.bin"))
        monkeypatch.undo()
    output = terminal.output()
    assert "part.bin:   0%|" in output and "downloaded" not in output
    assert output.split("\r")[-1].strip() == "", output  # the bar's line is blank again
    assert leftovers(cache) == []


def test_fetch_errors_survive_pickling(cache):
    import pickle
    error = files.FileFetchError("could not fetch u", url="u", cache_path="/c/u", status=404)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.url, copy.cache_path, copy.status) == \
        (files.FileFetchError, "could not fetch u", "u", "/c/u", 404)
    assert isinstance(copy, OSError)


def test_cache_dir_and_cache_paths_of_unusual_urls(cache, monkeypatch):
    assert files.cache_path("HTTPS://User:Secret@Host:8443/a/b.json") == \
        os.path.join(str(cache), "https", "Host_8443", "a", "b.json")  # credentials are not kept in the path
    assert files.cache_path("https://h/a/b.json?x=1") == \
        os.path.join(str(cache), "https", "h", "a", "b.json_q" + hashlib.sha1(b"x=1").hexdigest()[:12])
    assert files.cache_path("https://h/a//b.json") == os.path.join(str(cache), "https", "h", "a", "b.json")
    with pytest.raises(ValueError) as info:
        files.cache_path("https://h/dir/")
    assert str(info.value) == "'https://h/dir/' does not name a file (expected https://HOST/PATH/FILE)"
    for bad in ["https://h/a/%2E%2E/b", "https://h/a%5Cb", "https://h/a%00b", "https://h/./a"]:
        with pytest.raises(ValueError) as info:
            files.cache_path(bad)
        assert str(info.value) == f"{bad!r}: '.', '..' and escaped '/' path components are not accepted in URLs"
    monkeypatch.setenv("LMHP_CACHE_DIR", "")  # empty: the default
    assert files.cache_dir() == os.path.expanduser("~/.cache/lm-human-preferences")
    monkeypatch.setenv("LMHP_CACHE_DIR", "~/elsewhere")
    assert files.cache_dir() == os.path.expanduser("~/elsewhere")
    assert files.join("https://h/", "", "a") == "https://h/a"


def test_the_scheme_is_what_comes_before_the_first_separator_and_joins_trim_only_slashes(cache):
    assert files.is_remote("https://h/a.json?next=file:///etc/x")  # a URL in the query is not the scheme
    assert not files.is_remote("gs") and not files.is_remote("https")  # relative directories named like schemes
    assert files.join("gs://b/runX", "Xa") == "gs://b/runX/Xa"
    suffix = "_q" + hashlib.sha1(b"x=1").hexdigest()[:12]  # on the file's name, however deep it lies
    assert files.cache_path("https://h/a/b/c.json?x=1") == \
        os.path.join(str(cache), "https", "h", "a", "b", "c.json" + suffix)
    assert files.cache_path("https://h/f?x=1") == os.path.join(str(cache), "https", "h", "f" + suffix)


def test_a_file_that_is_not_json_is_named(server, cache, tmp_path):
    server.files["/labels.json"] = b"[1, 2"
    with pytest.raises(ValueError) as info:
        files.read_json(server.url("/labels.json"))
    assert str(info.value).startswith(f"{server.url('/labels.json')}: not valid JSON (Expecting")
    assert not isinstance(info.value, files.FileFetchError)


def test_text_is_read_as_utf_8_whatever_the_locale(server, cache, tmp_path):
    if sys.flags.utf8_mode:
        pytest.skip("Python's UTF-8 mode reads every file as UTF-8: the locale cannot make a difference")
    server.files["/labels.json"] = '{"text": "café"}'.encode()
    note = tmp_path / "note.txt"
    note.write_bytes("naïve".encode())
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # ASCII: a file opened without an encoding could not be read
    try:
        with pytest.raises(UnicodeDecodeError):
            with open(note) as f:
                f.read()
        assert files.read_text(str(note)) == "naïve"
        assert files.read_json(server.url("/labels.json")) == {"text": "café"}
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


# ----- files read together: every one missing from the cache is listed ------------------------------------

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused at once
HOW_TO = ("not in the cache (fetch them where there is a network and copy each to the path after its URL, or point "
          "$LMHP_CACHE_DIR at a cache holding them): ")


def listing(urls):
    return ", ".join(f"{url} -> {files.cache_path(url)}" for url in urls)


def test_a_file_of_a_set_that_cannot_be_fetched_lists_every_one_missing(server, cache):
    urls = [server.url(f"/models/x/{name}") for name in ("hparams.json", "checkpoint", "model.ckpt.index")]
    server.files["/models/x/hparams.json"] = b"{}"
    files.local_path(urls[0])  # already in the cache: not listed
    with pytest.raises(files.MissingFiles) as info, files.fetching_together("model x", lambda: files.not_cached(urls)):
        files.local_path(urls[1])
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, files.FileFetchError)  # one error line; still a fetch
    assert str(error) == (f"could not fetch {urls[1]}: HTTP 404 Not Found (not retried); cache path "
                          f"{files.cache_path(urls[1])}; 2 files of model x {HOW_TO}{listing(urls[1:])}")
    assert error.missing == [(url, files.cache_path(url)) for url in urls[1:]]
    assert (error.url, error.cache_path, error.status) == (urls[1], files.cache_path(urls[1]), 404)
    assert not os.path.exists(files.cache_path(urls[1])) and leftovers(cache) == []


def test_offline_a_set_lists_the_failed_file_too_when_it_is_not_one_of_the_set(cache):
    inside, outside = f"{CLOSED_PORT}/run/hparams.json", f"{CLOSED_PORT}/run/encoder.json"
    with pytest.raises(files.MissingFiles) as info, \
            files.fetching_together("run r", lambda: files.not_cached([inside, "/a/local/path"])):
        files.exists(outside)
    assert str(info.value).startswith(f"could not check whether {outside} exists: host unreachable (offline?)")
    assert str(info.value).endswith(f"; 2 files of run r {HOW_TO}{listing([outside, inside])}")
    assert info.value.status is None


def test_an_inner_set_keeps_its_own_list_and_other_errors_pass_through(cache):
    url = f"{CLOSED_PORT}/m/hparams.json"
    with pytest.raises(files.MissingFiles) as info, files.fetching_together("run r", lambda: []), \
            files.fetching_together("model m", lambda: files.not_cached([url])):
        files.read_text(url)
    assert str(info.value).endswith(f"; 1 file of model m {HOW_TO}{listing([url])}")
    with pytest.raises(KeyError), files.fetching_together("run r", lambda: []):
        raise KeyError("not a fetch")


# ----- progress of a download ------------------------------------------------------------------------------

BIG = 3_000_000  # bytes served at RATE: about 1.5 s, so that a bar updates many times
RATE = 2_000_000
FETCH_PROGRAM = "import sys; from lm_human_preferences.utils import files; files.local_path(sys.argv[1])"
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
BAR = re.compile(r"(?P<name>[\w.-]+): +(?P<percent>\d+)%\|[^|]*\| (?P<done>[\d.]+)(?P<done_unit>k|M|)B/"
                 r"(?P<total>[\d.]+M)B, (?P<rate>[\d.]+|\?)(?P<rate_unit>k|M|)B/s, (?P<left>\d\d:\d\d|\?) left")


def summary(url, target, size_text):
    """The line a completed download ends with, as a regex of the whole line."""
    return re.compile(rf"downloaded {re.escape(url)} -> {re.escape(target)} \({re.escape(size_text)} in "
                      rf"(?P<seconds>\d+\.\d)s, (?P<rate>[\d.]+) (?P<unit>k|M|)B/s\)")


class Terminal:
    """A pseudo-terminal 100 columns wide; what is written to its other end is read as it comes."""

    def __init__(self):
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.chunks = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every writer has closed its end
                return
            if not data:
                return
            self.chunks.append(data)

    def output(self) -> str:
        """Everything written, once every writer is done (closes this end of the terminal)."""
        os.close(self.slave)
        self.reader.join(30)
        os.close(self.master)
        return b"".join(self.chunks).decode()


def fetch_in_subprocess(url, cache, stderr, **env) -> subprocess.Popen:
    """A Python process that fetches `url` into `cache`, started as a rank of an MPI job would be when `env`
    says so."""
    full_env = {name: value for name, value in os.environ.items() if name not in RANK_VARIABLES}
    full_env.update(LMHP_CACHE_DIR=str(cache), PYTHONPATH=REPO_ROOT, **env)
    return subprocess.Popen([sys.executable, "-c", FETCH_PROGRAM, url], cwd=REPO_ROOT, env=full_env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)


def test_on_a_terminal_a_download_shows_a_bar_then_one_summary_line(server, cache, monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    body = np.random.RandomState(0).bytes(BIG)
    server.files["/gpt-2/models/124M/model.ckpt.data-00000-of-00001"] = body
    server.rate["/gpt-2/models/124M/model.ckpt.data-00000-of-00001"] = RATE
    url = server.url("/gpt-2/models/124M/model.ckpt.data-00000-of-00001")
    terminal = Terminal()
    with open(terminal.slave, "w", closefd=False) as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        start = time.monotonic()
        target = files.local_path(url)
        took = time.monotonic() - start
        monkeypatch.undo()
    output = terminal.output()
    with open(target, "rb") as f:
        assert f.read() == body

    updates = [BAR.match(part) for part in re.split(r"[\r\n]", output) if BAR.match(part)]
    assert all(update["name"] == "model.ckpt.data-00000-of-00001" and update["total"] == "3.00M"
               for update in updates), output
    done = [float(update["done"]) * {"": 1, "k": 1e3, "M": 1e6}[update["done_unit"]] for update in updates]
    measured = [update for update in updates if update["rate"] != "?" and update["left"] != "?"]
    assert len(measured) >= 3 and len(set(done)) >= 3, output  # carriage-return updates while it runs
    assert done == sorted(done) and 0 < done[-1] <= BIG
    assert all(0 <= int(update["percent"]) <= 100 for update in updates)
    rates = [float(update["rate"]) * {"": 1, "k": 1e3, "M": 1e6}[update["rate_unit"]] for update in measured]
    assert all(RATE / 4 < rate < RATE * 2 for rate in rates), output  # the rate the server sends at

    lines = [line for line in output.split("\r\n") if line.strip("\r ")]  # the terminal ends lines with CR LF
    assert len(lines) == 1, output  # the bar updates one line in place
    final = lines[0].split("\r")[-1]  # what the line shows at the end: the bar cleared, the summary written over it
    match = summary(url, target, "3.0 MB").fullmatch(final)
    assert match, output
    assert abs(float(match["seconds"]) - took) < 0.5 and float(match["seconds"]) >= BIG / RATE * 0.8
    assert float(match["rate"]) == pytest.approx(BIG / 1e6 / float(match["seconds"]), rel=0.1)
    assert output.endswith("\r\n")


def test_on_a_terminal_the_bar_follows_the_width_of_the_window(server, cache, monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    server.files["/m.bin"] = b"m" * 1_000_000
    server.rate["/m.bin"] = 1_000_000  # about 1 s
    terminal = Terminal()  # 100 columns
    narrow = struct.pack("HHHH", 24, 60, 0, 0)
    resize = threading.Timer(0.4, lambda: fcntl.ioctl(terminal.slave, termios.TIOCSWINSZ, narrow))
    with open(terminal.slave, "w", closefd=False) as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        resize.start()
        files.local_path(server.url("/m.bin"))
        monkeypatch.undo()
    bars = [part.rstrip(" ") for part in re.split(r"[\r\n]", terminal.output()) if part.startswith("m.bin:")]
    # a bar as wide as the window, then, once it is narrowed, as wide as the narrower one (no wrapped lines)
    assert len(bars[0]) == 99 and len(bars[-1]) == 59, bars


def test_in_a_log_a_download_is_exactly_one_summary_line(server, cache):
    server.files["/labels/descriptiveness/offline_5k.json"] = body = b"[]" * 600_000
    server.rate["/labels/descriptiveness/offline_5k.json"] = 4 * RATE
    url = server.url("/labels/descriptiveness/offline_5k.json")
    process = fetch_in_subprocess(url, cache, subprocess.PIPE)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    target = files.cache_path(url)
    assert out == b"" and b"\r" not in err
    lines = err.decode().splitlines()
    assert len(lines) == 1 and summary(url, target, "1.2 MB").fullmatch(lines[0]), err
    with open(target, "rb") as f:
        assert f.read() == body


@pytest.mark.parametrize("variable", ["OMPI_COMM_WORLD_RANK", "PMI_RANK"])
def test_a_rank_other_than_0_shows_nothing_on_a_terminal_or_in_a_log(server, cache, variable):
    server.files["/shared/vocab.bpe"] = body = b"merges " * 150_000
    server.rate["/shared/vocab.bpe"] = 2 * RATE
    url = server.url("/shared/vocab.bpe")
    terminal = Terminal()
    process = fetch_in_subprocess(url, cache, terminal.slave, **{variable: "1"})
    process.wait(timeout=120)
    assert process.returncode == 0 and terminal.output() == ""
    assert files.local_path(url) and open(files.cache_path(url), "rb").read() == body
    os.remove(files.cache_path(url))
    process = fetch_in_subprocess(url, cache, subprocess.PIPE, **{variable: "1"})
    out, err = process.communicate(timeout=120)
    assert (process.returncode, out, err) == (0, b"", b"")
    assert open(files.cache_path(url), "rb").read() == body


def test_the_rank_is_read_from_the_launchers_environment(monkeypatch, server, cache, capfd):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert files._launcher_rank() == 0
    for name in ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"]:
        monkeypatch.setenv(name, "3")
        assert files._launcher_rank() == 3
        monkeypatch.setenv(name, "0")
        assert files._launcher_rank() == 0
        monkeypatch.setenv(name, "")  # empty or not a number: the next variable is asked
        assert files._launcher_rank() == 0
    monkeypatch.setenv("PMIX_RANK", "x")
    monkeypatch.setenv("PMI_RANK", "2")
    assert files._launcher_rank() == 2
    server.files["/a.bin"] = b"a" * 10
    files.local_path(server.url("/a.bin"))
    assert capfd.readouterr() == ("", "")
    monkeypatch.setenv("PMI_RANK", "0")
    server.files["/b.bin"] = b"b" * 10
    files.local_path(server.url("/b.bin"))
    assert capfd.readouterr().err.startswith(f"downloaded {server.url('/b.bin')} -> ")


def test_a_stderr_that_is_not_a_file_gets_the_summary_line_only(server, cache, monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    server.files["/a.bin"] = b"a" * 5000
    written = []
    # a stream that is no file (a logging wrapper, say): no isatty, so no bar
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=lambda text: written.append(text) or len(text),
                                                             flush=lambda: None))
    target = files.local_path(server.url("/a.bin"))
    monkeypatch.undo()
    text = "".join(written)
    assert text.endswith("\n") and summary(server.url("/a.bin"), target, "5.0 kB").fullmatch(text[:-1]), text


def test_the_rate_of_a_short_download_is_measured_over_its_own_time(server, cache, monkeypatch, capfd):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    server.files["/small.bin"] = b"s" * 200_000
    target = files.local_path(server.url("/small.bin"))
    match = summary(server.url("/small.bin"), target, "200.0 kB").fullmatch(capfd.readouterr().err.rstrip("\n"))
    assert match
    rate = float(match["rate"]) * {"": 1, "k": 1e3, "M": 1e6}[match["unit"]]
    assert rate >= 0.9 * 200_000 / (float(match["seconds"]) + 0.05), match.group(0)  # (the time shown is rounded)


def test_retry_and_summary_lines_reach_a_buffered_log_at_once(server, cache, monkeypatch, tmp_path):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    server.fail_503["/gone.json"] = 1  # then 404: a retry line, and no summary line after it to flush it
    server.files["/f.json"] = b"[]"
    log = tmp_path / "job.log"
    with open(log, "w") as stderr:  # a file: block-buffered, unlike a terminal or a pipe
        monkeypatch.setattr(sys, "stderr", stderr)
        with pytest.raises(files.FileFetchError):
            files.local_path(server.url("/gone.json"))
        retried = log.read_text().splitlines()  # read while it is still open: what was flushed
        files.local_path(server.url("/f.json"))
        downloaded = log.read_text().splitlines()[len(retried):]
        monkeypatch.undo()
    assert len(retried) == 1 and retried[0].startswith(
        f"fetch {server.url('/gone.json')} failed (HTTP 503 Service Unavailable); retry 1 of 2 in "), retried
    assert len(downloaded) == 1 and downloaded[0].startswith(f"downloaded {server.url('/f.json')} -> "), downloaded


@pytest.mark.parametrize("size, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (4_200, "4.2 kB"),
                                        (999_949, "999.9 kB"), (497_759_126, "497.8 MB"), (6_231_069_277, "6.2 GB"),
                                        (1.5e12, "1.5 TB"), (2.5e15, "2500.0 TB")])
def test_sizes_are_written_in_decimal_units(size, text):
    assert files._size_text(size) == text


@pytest.mark.parametrize("seconds, text", [(0, "0.0s"), (0.44, "0.4s"), (59.94, "59.9s"), (60, "1m00s"),
                                           (187.4, "3m07s"), (3599.4, "59m59s"), (3600, "1h00m"), (7500, "2h05m")])
def test_times_are_written_for_a_glance(seconds, text):
    assert files._time_text(seconds) == text


# ----- writes ---------------------------------------------------------------------------------------------

def test_write_text_atomic(tmp_path):
    path = tmp_path / "run" / "policy" / "encoding"
    files.write_text_atomic(str(path), '"main"')
    assert path.read_text() == '"main"'
    files.write_text_atomic(str(path), '"test"')
    assert path.read_text() == '"test"'
    assert os.listdir(path.parent) == ["encoding"]
    with pytest.raises(ValueError, match="only local paths"):
        files.write_text_atomic("gs://bucket/x", "y")


@contextlib.contextmanager
def file_size_limit(limit):
    """Writes beyond `limit` bytes of any file fail with EFBIG, as on a full disk (RLIMIT_FSIZE; SIGXFSZ ignored
    so that the process gets the error instead of being killed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(5, "Input/output error (fsync)")
    monkeypatch.setattr(files.os, "fsync", fsync)


def fail_rename(monkeypatch):
    def replace(source, target):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(files.os, "replace", replace)


def open_files_under(directory):
    """This process's open file descriptors on files in `directory` (removed ones too)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile (e.g. listdir's own descriptor)
            pass
    return [target for target in targets if target.startswith(str(directory) + os.sep)]


@pytest.mark.parametrize("failure", ["disk full after 4 KiB", "fsync", "rename"])
def test_an_interrupted_write_leaves_the_old_content_and_no_temporary_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "labels.json"
    files.write_text_atomic(str(path), '"old"\n')
    new = json.dumps(list(range(20000)))  # about 110 KB: the disk fills up in the middle of it
    if failure == "fsync":
        fail_fsync(monkeypatch)
    elif failure == "rename":
        fail_rename(monkeypatch)
    limit = file_size_limit(4096) if failure.startswith("disk full") else contextlib.nullcontext()
    with pytest.raises(OSError) as raised, limit:
        files.write_text_atomic(str(path), new)
    monkeypatch.undo()
    assert path.read_text() == '"old"\n'
    assert os.listdir(tmp_path) == ["labels.json"]
    # the temporary file is closed, not only removed, even while the caller still holds the error
    assert not open_files_under(tmp_path), raised.value


def test_a_stream_that_breaks_halfway_leaves_the_old_file(tmp_path):
    """As a download whose connection drops: the part written so far never replaces the file."""
    path = tmp_path / "model.ckpt.data-00000-of-00001"
    path.write_bytes(b"old weights")

    def chunks():
        yield b"new weights, first half " * 1000
        raise ConnectionError("connection reset in the middle of the transfer")

    with pytest.raises(ConnectionError), files._atomic_file(str(path)) as f:
        for chunk in chunks():
            f.write(chunk)
    assert path.read_bytes() == b"old weights"
    assert os.listdir(tmp_path) == [path.name]


def test_a_write_in_progress_is_a_part_file_beside_its_target_that_is_not_uploaded(gcs_bucket, cache, tmp_path):
    run = tmp_path / "run"
    files.write_text_atomic(str(run / "hparams.json"), "{}")
    with files._atomic_file(str(run / "labels.json")) as f:
        f.write(b"[1, 2")
        others = [name for name in os.listdir(run) if name != "hparams.json"]
        assert len(others) == 1 and re.fullmatch(r"labels\.json\.\w+\.part", others[0]), others
        assert files.sync_up(run, f"{gcs_bucket}/run").uploaded == ["hparams.json"]
    assert files.sync_up(run, f"{gcs_bucket}/run").uploaded == ["labels.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_an_atomic_write_gets_the_permissions_of_a_new_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        files.write_text_atomic(str(tmp_path / "a.json"), "{}")
        files.write_new_text_atomic(str(tmp_path / "b.json"), "{}")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ["a.json", "b.json"]] == [mode, mode]


def test_write_new_text_atomic_never_overwrites(tmp_path):
    path = tmp_path / "out" / "scores.jsonl"
    files.write_new_text_atomic(str(path), "1\n")
    assert path.read_text() == "1\n"
    with pytest.raises(FileExistsError):
        files.write_new_text_atomic(str(path), "2\n")
    assert path.read_text() == "1\n" and os.listdir(path.parent) == ["scores.jsonl"]
    with pytest.raises(ValueError, match="only local paths"):
        files.write_new_text_atomic("gs://bucket/x", "y")


# ----- MPI: once per machine ------------------------------------------------------------------------------

def fetch_on_two_ranks(server, cache, path):
    result = run(2, "fetch.py", server.url(path),
                 env={"LMHP_CACHE_DIR": str(cache), "LMHP_FETCH_RETRIES": "0"})
    assert result.returncode == 0, result.stdout
    reports = {r: json.loads(line) for r, line in rank_lines(result.stdout, "RESULT").items()}
    assert sorted(reports) == [0, 1], result.stdout
    return reports, result.stdout


def test_mpi_ranks_on_one_machine_download_once(server, cache):
    server.files["/shared/vocab.bpe"] = b"merges " * 1000
    reports, output = fetch_on_two_ranks(server, cache, "/shared/vocab.bpe")
    assert server.gets("/shared/vocab.bpe") == 1
    target = files.cache_path(server.url("/shared/vocab.bpe"))
    downloaded = [line for line in output.splitlines() if line.startswith("downloaded")]
    assert len(downloaded) == 1 and summary(server.url("/shared/vocab.bpe"), target, "7.0 kB").fullmatch(
        downloaded[0]), output  # one line for the job: rank 0's
    for report in reports.values():
        assert report["path"] == str(cache / "http" / server.host.replace(":", "_") / "shared" / "vocab.bpe")
        assert report["text"] == "merges " * 1000


def test_mpi_error_of_the_downloading_rank_reaches_the_others(server, cache):
    reports, output = fetch_on_two_ranks(server, cache, "/missing/encoder.json")
    assert "downloaded" not in output
    assert server.gets("/missing/encoder.json") == 1
    for report in reports.values():
        assert server.url("/missing/encoder.json") in report["error"] and "HTTP 404" in report["error"]
        assert (report["type"], report["status"]) == ("FileFetchError", 404)
        assert report["cache_path"] == files.cache_path(server.url("/missing/encoder.json"))
    assert reports[1]["error"] == reports[0]["error"]  # one message, which a job relaying its ranks shows once


COLLECTIVE_PROGRAM = """# Every rank reads some files collectively, and each rank a file of its own (collective=False).
import json, sys
from lm_human_preferences.utils import files, mpi

base, run, missing_run, unstorable_run = sys.argv[1:]
rank = mpi.rank()


def outcome(call):
    try:
        return {"value": call()}
    except Exception as e:
        return {"type": type(e).__name__, "error": str(e), "url": getattr(e, "url", None),
                "cache_path": getattr(e, "cache_path", None), "status": getattr(e, "status", None)}


report = {
    "json": outcome(lambda: files.read_json(base + "/refused-once/a.json")),
    "text": outcome(lambda: files.read_text(base + "/refused-once/b.txt")),
    "path": outcome(lambda: files.local_path(base + "/refused-once/c.bin")),
    "own_json": outcome(lambda: files.read_json(f"{base}/rank{rank}/a.json", collective=False)),
    "own_text": outcome(lambda: files.read_text(f"{base}/rank{rank}/b.txt", collective=False)),
    "own_path": outcome(lambda: open(files.local_path(f"{base}/rank{rank}/c.bin", collective=False)).read()),
    "staging": outcome(lambda: files._local_files(files.staging_dir(run))),
    "missing_run": outcome(lambda: files.staging_dir(missing_run)),
    "unstorable_run": outcome(lambda: files.staging_dir(unstorable_run)),
}
print("RESULT", rank, json.dumps(report), flush=True)
"""


def refused_once(body):
    """A custom answer: 404 to the first request, `body` to the next ones (a rank that fetched for itself would
    get the file)."""
    answers = iter([answer(404)])
    return lambda handler: next(answers, answer(200, body=body))(handler)


def test_mpi_reads_are_collective_unless_asked_otherwise(server, cache, storage_proxy, gcs_bucket, tmp_path):
    for name in ["a.json", "b.txt", "c.bin"]:
        server.custom[f"/refused-once/{name}"] = refused_once(b'"shared"')
        for rank in [0, 1]:
            server.files[f"/rank{rank}/{name}"] = f'"rank {rank}"'.encode()
    run_url, missing_run = f"{gcs_bucket}/run", "gs://no-such-bucket-lmhp/run"
    upload(f"{run_url}/hparams.json", b"{}")
    upload(f"{run_url}/tb/events", b"e")
    unstorable_run = f"{gcs_bucket}/unstorable"
    upload(f"{unstorable_run}/a//b", b"x")  # staging fails with a ValueError, not a fetch error
    program = tmp_path / "collective.py"
    program.write_text(COLLECTIVE_PROGRAM)
    storage_proxy.calls.clear()
    result = run(2, str(program), server.url(""), run_url, missing_run, unstorable_run, timeout=60,
                 env={"LMHP_CACHE_DIR": str(cache), "LMHP_FETCH_RETRIES": "0"})
    assert result.returncode == 0, result.stdout
    reports = {r: json.loads(line) for r, line in rank_lines(result.stdout, "RESULT").items()}
    assert sorted(reports) == [0, 1], result.stdout

    # collective: rank 0 of the machine fetched once, and its refusal reached the other rank as it was
    for key, name in [("json", "a.json"), ("text", "b.txt"), ("path", "c.bin")]:
        url = server.url(f"/refused-once/{name}")
        error = {"type": "FileFetchError", "url": url, "cache_path": files.cache_path(url), "status": 404,
                 "error": f"could not fetch {url}: HTTP 404 Not Found (not retried); cache path "
                          f"{files.cache_path(url)}"}
        assert reports[0][key] == reports[1][key] == error, (key, reports)
        assert server.gets(f"/refused-once/{name}") == 1
    # not collective: each rank fetched its own file
    for rank in [0, 1]:
        assert (reports[rank]["own_json"], reports[rank]["own_text"], reports[rank]["own_path"]) == \
            ({"value": f"rank {rank}"}, {"value": f'"rank {rank}"'}, {"value": f'"rank {rank}"'}), reports[rank]
        assert all(server.gets(f"/rank{rank}/{name}") == 1 for name in ["a.json", "b.txt", "c.bin"])
    # a save directory is listed and staged once per machine; its failure reaches every rank
    assert reports[0]["staging"] == reports[1]["staging"] == {"value": ["hparams.json", "tb/events"]}
    bucket = gcs_bucket[len("gs://"):]
    lists = [path for method, path, _, _ in storage_proxy.calls
             if method == "GET" and path.partition("?")[0] == f"/storage/v1/b/{bucket}/o" and "prefix=run%2F" in path]
    assert len(lists) == 1, storage_proxy.calls
    staging = os.path.join(str(cache), "staging", "no-such-bucket-lmhp", "run")
    assert reports[0]["missing_run"] == reports[1]["missing_run"]
    assert (reports[1]["missing_run"]["type"], reports[1]["missing_run"]["url"],
            reports[1]["missing_run"]["cache_path"], reports[1]["missing_run"]["status"]) == \
        ("FileFetchError", missing_run, staging, 404)
    unstorable = (f"{unstorable_run}: object 'unstorable/a//b' cannot be stored as a local file (empty, '.' or '..' "
                  f"path component); rename or remove it")
    assert (reports[0]["unstorable_run"]["type"], reports[0]["unstorable_run"]["error"]) == ("ValueError", unstorable)
    assert reports[1]["unstorable_run"] == {  # the other rank's error names the kind of rank 0's
        "type": "FileFetchError", "error": f"ValueError: {unstorable}", "url": unstorable_run, "status": None,
        "cache_path": os.path.join(str(cache), "staging", gcs_bucket[len("gs://"):], "unstorable")}

    # this process, outside the job, fetches and stages the same things itself (the refusal was not cached)
    assert files.read_json(server.url("/refused-once/a.json")) == "shared"
    assert files.read_text(server.url("/refused-once/b.txt")) == '"shared"'
    assert files.read_text(files.local_path(server.url("/refused-once/c.bin"))) == '"shared"'
    assert files.read_json(server.url("/rank1/a.json"), collective=False) == "rank 1"
    assert files._local_files(files.staging_dir(run_url)) == ["hparams.json", "tb/events"]


# ----- gs:// save directories, against a local Cloud Storage emulator (conftest.gcs_bucket) ---------------

class TinyRun:
    """A run directory as the trainers write it: hparams.json, a growing TensorBoard event file, and real
    TensorFlow checkpoints (model/checkpoints/model.ckpt-STEP, the Saver keeping the last two) of two variables
    whose values are the step."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.weights = tf.compat.v1.get_variable("weights", shape=[3, 4], initializer=tf.compat.v1.zeros_initializer())
        self.bias = tf.compat.v1.get_variable("bias", shape=[4], initializer=tf.compat.v1.zeros_initializer())
        self.step = tf.compat.v1.placeholder(tf.float32, [])
        self.assign = tf.group(self.weights.assign(tf.fill([3, 4], self.step)),
                               self.bias.assign(tf.fill([4], self.step)))
        self.saver = tf.compat.v1.train.Saver(max_to_keep=2, save_relative_paths=True)
        self.sess = tf.compat.v1.Session()

    def save(self, step):
        self.sess.run(self.assign, {self.step: float(step)})
        files.write_text_atomic(os.path.join(self.directory, "hparams.json"), '{"n_layer": 2}\n')
        os.makedirs(os.path.join(self.directory, "tb"), exist_ok=True)
        with open(os.path.join(self.directory, "tb", "events.out.tfevents.1"), "a") as f:
            f.write(f"step {step}\n")
        checkpoints = os.path.join(self.directory, "model", "checkpoints")
        os.makedirs(checkpoints, exist_ok=True)
        self.saver.save(self.sess, os.path.join(checkpoints, "model.ckpt"), global_step=step)


@pytest.fixture
def tiny_run(tmp_path):
    tiny = TinyRun(tmp_path / "local")
    yield tiny
    tiny.sess.close()


STATE = "model/checkpoints/checkpoint"


def ckpt(step):
    """The relative names of checkpoint `step`'s files."""
    prefix = f"model/checkpoints/model.ckpt-{step}"
    return {f"{prefix}.index", f"{prefix}.data-00000-of-00001", f"{prefix}.meta"}


def checkpoint_values(checkpoint_dir):
    """(path of the latest checkpoint, {variable: value}) as TensorFlow reads them from `checkpoint_dir`."""
    path = tf.train.latest_checkpoint(str(checkpoint_dir))
    assert path is not None, f"no checkpoint in {checkpoint_dir}"
    reader = tf.train.load_checkpoint(path)
    return path, {name: reader.get_tensor(name) for name in ["weights", "bias"]}


def remote_objects(url):
    """{name relative to url: generation} of what the bucket holds under url/."""
    bucket, _, prefix = url[len("gs://"):].partition("/")
    blobs = storage.Client(project=None).list_blobs(bucket, prefix=prefix + "/")
    return {blob.name[len(prefix) + 1:]: blob.generation for blob in blobs}


def remote_text(url):
    bucket, _, name = url[len("gs://"):].partition("/")
    return storage.Client(project=None).bucket(bucket).blob(name).download_as_text()


def latest_named(state_text):
    return re.search(r'^model_checkpoint_path: "(.*)"$', state_text, re.MULTILINE).group(1)


@pytest.fixture
def record_uploads(monkeypatch):
    """The object names files._upload_gcs is called with, in order (the real upload still happens)."""
    calls = []
    upload = files._upload_gcs

    def recording(bucket, path, object_name):
        calls.append(object_name)
        return upload(bucket, path, object_name)

    monkeypatch.setattr(files, "_upload_gcs", recording)
    return calls


def test_gcs_round_trip_of_a_run_with_a_checkpoint(gcs_bucket, tiny_run, cache, tmp_path, monkeypatch):
    url = f"{gcs_bucket}/runs/first"
    tiny_run.save(1)
    assert not files.remote_dir_exists(url) and not files.remote_dir_exists(gcs_bucket)

    synced = files.sync_up(tiny_run.directory, url)
    assert set(synced.uploaded) == {"hparams.json", "tb/events.out.tfevents.1", STATE} | ckpt(1)
    assert synced.uploaded[-1] == STATE and synced.deleted == []
    assert set(remote_objects(url)) == set(synced.uploaded)  # the sync record stays local
    assert files.remote_dir_exists(url) and files.remote_dir_exists(f"{gcs_bucket}/runs")
    assert files.remote_dir_exists(gcs_bucket)  # a save directory at the bucket's root
    assert not files.remote_dir_exists(f"{gcs_bucket}/runs/firs") and not files.remote_dir_exists(f"{url}/tb/x")

    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "fresh_cache"))  # a reader on another machine
    assert files.read_json(files.join(url, "hparams.json")) == {"n_layer": 2}
    state = files.local_path(files.join(url, STATE))
    for name in ckpt(1):
        files.local_path(files.join(url, name))
    path, values = checkpoint_values(os.path.dirname(state))
    assert path == os.path.join(os.path.dirname(state), "model.ckpt-1")
    np.testing.assert_array_equal(values["weights"], np.ones([3, 4]))
    np.testing.assert_array_equal(values["bias"], np.ones([4]))


def test_gcs_sync_uploads_what_changed_state_file_last(gcs_bucket, tiny_run, cache, record_uploads):
    url = f"{gcs_bucket}/run"
    tiny_run.save(1)
    files.sync_up(tiny_run.directory, url)
    first = remote_objects(url)
    record_uploads.clear()

    assert files.sync_up(tiny_run.directory, url) == files.Synced([], [])
    assert record_uploads == [] and remote_objects(url) == first

    tiny_run.save(2)  # hparams.json rewritten with the same content; the event file grew; a new checkpoint
    synced = files.sync_up(tiny_run.directory, url)
    assert set(synced.uploaded) == {"tb/events.out.tfevents.1", STATE} | ckpt(2)
    assert synced.uploaded[-1] == STATE
    assert record_uploads == [f"run/{name}" for name in synced.uploaded]
    now = remote_objects(url)
    for name in {"hparams.json"} | ckpt(1):
        assert now[name] == first[name], f"{name} was uploaded again"
    assert remote_text(files.join(url, "tb/events.out.tfevents.1")) == "step 1\nstep 2\n"
    assert latest_named(remote_text(files.join(url, STATE))) == "model.ckpt-2"


def test_gcs_sync_deletes_dropped_checkpoints_after_the_new_state_file(gcs_bucket, tiny_run, cache, monkeypatch):
    url = f"{gcs_bucket}/run"
    tiny_run.save(1)
    tiny_run.save(2)
    files.sync_up(tiny_run.directory, url)
    tiny_run.save(3)  # max_to_keep=2: the Saver deletes checkpoint 1 locally
    assert not os.path.exists(os.path.join(tiny_run.directory, "model", "checkpoints", "model.ckpt-1.index"))

    state_seen_at_deletion = []
    delete = files._delete_gcs

    def recording(bucket, object_name):
        state_seen_at_deletion.append(latest_named(remote_text(files.join(url, STATE))))
        return delete(bucket, object_name)

    monkeypatch.setattr(files, "_delete_gcs", recording)
    synced = files.sync_up(tiny_run.directory, url)
    assert sorted(synced.deleted) == sorted(ckpt(1))
    assert state_seen_at_deletion == ["model.ckpt-3"] * len(ckpt(1))
    assert set(remote_objects(url)) == {"hparams.json", "tb/events.out.tfevents.1", STATE} | ckpt(2) | ckpt(3)
    assert files.sync_up(tiny_run.directory, url) == files.Synced([], [])  # deletions are not repeated


def test_gcs_large_files_are_compared_by_size_and_mtime(gcs_bucket, cache, tmp_path, record_uploads):
    url = f"{gcs_bucket}/run"
    big = tmp_path / "local" / "model.ckpt-1.data-00000-of-00001"
    big.parent.mkdir()
    content = np.random.RandomState(0).bytes(9 << 20)  # over 8 MiB: a resumable (chunked) upload
    big.write_bytes(content)
    assert files.sync_up(big.parent, url).uploaded == [big.name]
    assert files.sync_up(big.parent, url).uploaded == []  # same size and mtime: not read, not sent
    stat = big.stat()
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten: same size, later mtime
    assert files.sync_up(big.parent, url).uploaded == [big.name]
    assert record_uploads == ["run/" + big.name] * 2
    with open(files.local_path(files.join(url, big.name)), "rb") as f:
        assert f.read() == content


def test_gcs_a_file_of_exactly_the_hashed_size_is_compared_by_content(gcs_bucket, cache, tmp_path):
    url = f"{gcs_bucket}/run"
    local = tmp_path / "local"
    local.mkdir()
    path = local / "events"
    path.write_bytes(b"a" * files._HASHED_BYTES)
    assert files.sync_up(local, url).uploaded == ["events"]
    assert files.sync_up(local, url).uploaded == []
    before = path.stat()
    path.write_bytes(b"b" * files._HASHED_BYTES)  # rewritten within the timestamp's granularity: same size and mtime
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert files.sync_up(local, url).uploaded == ["events"]
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # touched, the content as uploaded
    assert files.sync_up(local, url).uploaded == []


def test_gcs_names_with_spaces_or_a_leading_x(gcs_bucket, cache, tmp_path):
    upload(f"{gcs_bucket}/XLNet/hparams.json", b"{}")
    assert files.read_json(f"{gcs_bucket}/XLNet/hparams.json") == {}
    url = f"{gcs_bucket}/my runs/run 1"
    local = tmp_path / "local"
    (local / "tb logs").mkdir(parents=True)
    (local / "tb logs" / "events 1").write_text("e")
    assert files.sync_up(local, url).uploaded == ["tb logs/events 1"]
    staging = files.staging_dir(url)
    assert staging == os.path.join(str(cache), "staging", gcs_bucket[len("gs://"):], "my runs", "run 1")
    with open(os.path.join(staging, "tb logs", "events 1")) as f:
        assert f.read() == "e"


def test_gcs_failed_upload_leaves_the_previous_checkpoint_readable(gcs_bucket, tiny_run, cache, monkeypatch,
                                                                   record_uploads):
    url = f"{gcs_bucket}/run"
    tiny_run.save(1)
    files.sync_up(tiny_run.directory, url)
    tiny_run.save(2)
    record_uploads.clear()
    upload = files._upload_gcs

    def connection_lost_at_the_index(bucket, path, object_name):
        if object_name.endswith("model.ckpt-2.index"):
            raise requests.exceptions.ConnectionError("connection reset by peer")  # transient: retried, then fails
        return upload(bucket, path, object_name)

    monkeypatch.setattr(files, "_upload_gcs", connection_lost_at_the_index)
    with pytest.raises(files.FileFetchError) as info:
        files.sync_up(tiny_run.directory, url)
    message = str(info.value)
    assert f"{url}/model/checkpoints/model.ckpt-2.index" in message and "3 attempts" in message
    assert "connection reset" in message

    remote = remote_objects(url)
    assert latest_named(remote_text(files.join(url, STATE))) == "model.ckpt-1"
    assert ckpt(1) <= set(remote)  # what the remote state file names is all there
    assert "model/checkpoints/model.ckpt-2.index" not in remote
    assert not any(name.endswith("/checkpoint") for name in record_uploads)  # the state file was never sent

    monkeypatch.setattr(files, "_upload_gcs", upload)  # the network is back: the rest goes up, nothing twice
    synced = files.sync_up(tiny_run.directory, url)
    assert synced.uploaded == ["model/checkpoints/model.ckpt-2.index", "model/checkpoints/model.ckpt-2.meta",
                               "tb/events.out.tfevents.1", STATE]
    assert latest_named(remote_text(files.join(url, STATE))) == "model.ckpt-2"


def test_gcs_staging_dir_is_a_copy_of_the_remote_run(gcs_bucket, tiny_run, cache, tmp_path, record_uploads):
    url = f"{gcs_bucket}/experiments/run"
    local_save_dir = str(tmp_path / "local_run")
    assert files.staging_dir(local_save_dir) == local_save_dir
    assert files.sync_up(local_save_dir, local_save_dir) == files.Synced([], [])

    new = files.staging_dir(f"{gcs_bucket}/experiments/new")
    assert new == os.path.join(str(cache), "staging", gcs_bucket[len("gs://"):], "experiments", "new")
    assert files._local_files(new) == []

    tiny_run.save(1)
    tiny_run.save(2)
    files.sync_up(tiny_run.directory, url)
    record_uploads.clear()

    staging = os.path.join(str(cache), "staging", gcs_bucket[len("gs://"):], "experiments", "run")
    os.makedirs(os.path.join(staging, "old", "tb"))
    with open(os.path.join(staging, "old", "tb", "stale"), "w") as f:  # left by an earlier run of this name
        f.write("stale")
    assert files.staging_dir(url) == staging
    assert files._local_files(staging) == files._local_files(tiny_run.directory)
    assert not os.path.exists(os.path.join(staging, "old"))
    path, values = checkpoint_values(os.path.join(staging, "model", "checkpoints"))
    assert path == os.path.join(staging, "model", "checkpoints", "model.ckpt-2")
    np.testing.assert_array_equal(values["weights"], np.full([3, 4], 2.0))

    assert files.sync_up(staging, url) == files.Synced([], [])  # what was downloaded is not uploaded back
    with open(os.path.join(staging, "tb", "events.out.tfevents.1"), "a") as f:  # training resumes there
        f.write("step 3\n")
    assert files.sync_up(staging, url).uploaded == ["tb/events.out.tfevents.1"]
    assert record_uploads == ["experiments/run/tb/events.out.tfevents.1"]


def upload(url, data):
    bucket, _, name = url[len("gs://"):].partition("/")
    storage.Client(project=None).bucket(bucket).blob(name).upload_from_string(data)


def test_gcs_download_shows_its_size_on_a_terminal_and_one_line_at_the_end(gcs_bucket, cache, monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    url = f"{gcs_bucket}/gpt-2/models/124M/model.ckpt.index"
    data = np.random.RandomState(1).bytes(300_000)
    upload(url, data)
    terminal = Terminal()
    with open(terminal.slave, "w", closefd=False) as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        target = files.local_path(url)
        monkeypatch.undo()
    output = terminal.output()
    with open(target, "rb") as f:
        assert f.read() == data
    assert "model.ckpt.index:   0%|" in output and "| 0.00B/300kB, ?B/s, ? left" in output  # the object's size
    assert summary(url, target, "300.0 kB").fullmatch(output.split("\r\n")[0].split("\r")[-1]), output


def test_gcs_staging_reports_each_file_it_downloads_once(gcs_bucket, cache, capfd):
    url = f"{gcs_bucket}/runs/r"
    upload(f"{url}/hparams.json", b'{"n_layer": 2}')
    upload(f"{url}/tb/events", b"e" * 2000)
    staging = files.staging_dir(url)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert summary(f"{url}/hparams.json", os.path.join(staging, "hparams.json"), "14 B").fullmatch(lines[0])
    assert summary(f"{url}/tb/events", os.path.join(staging, "tb", "events"), "2.0 kB").fullmatch(lines[1])
    assert files.staging_dir(url) == staging
    assert capfd.readouterr().err == ""  # already there (same MD5): nothing fetched, nothing said


def test_gcs_errors_name_the_url_and_the_fix(gcs_bucket, tiny_run, cache, tmp_path, monkeypatch):
    tiny_run.save(1)
    missing = "gs://no-such-bucket-lmhp/run"
    for attempt in [lambda: files.remote_dir_exists(missing), lambda: files.staging_dir(missing),
                    lambda: files.sync_up(tiny_run.directory, missing)]:
        with pytest.raises(files.FileFetchError) as info:
            attempt()
        assert "gs://no-such-bucket-lmhp/run" in str(info.value)
        assert "does the bucket gs://no-such-bucket-lmhp exist?" in str(info.value)

    for bad in ["https://example.com/run", "gs://bucket/a/../b", "gs://bucket/run?x=1"]:
        with pytest.raises(ValueError, match="save"):
            files.staging_dir(bad)
        with pytest.raises(ValueError, match="save"):
            files.sync_up(tiny_run.directory, bad)

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # real Cloud Storage, and no usable credentials
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    with pytest.raises(files.FileFetchError) as info:
        files.sync_up(tiny_run.directory, "gs://some-bucket/run")
    assert str(info.value).startswith("could not upload to gs://some-bucket/run: no Google Cloud credentials (")
    assert str(info.value).endswith(f"; run `gcloud auth application-default login` or set GOOGLE_APPLICATION_"
                                    f"CREDENTIALS to a service account key file; local path {tiny_run.directory}")

    import google.cloud
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # as if google-cloud-storage were not installed
    monkeypatch.delattr(google.cloud, "storage")
    with pytest.raises(files.FileFetchError) as info:
        files.remote_dir_exists("gs://some-bucket/run")
    assert str(info.value) == ("could not list gs://some-bucket/run: gs:// paths need google-cloud-storage "
                               "(pip install google-cloud-storage)")


# ----- gs:// error paths, against the emulator ------------------------------------------------------------

def failing_first(monkeypatch, cls, method, errors):
    """`cls.method` raises `errors` one after another on its first calls, then does its real work."""
    real = getattr(cls, method)
    pending = list(errors)

    def wrapper(*args, **kwargs):
        if pending:
            raise pending.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)
    return pending


def test_a_missing_gcs_object_fails_at_once_naming_it(gcs_bucket, cache, monkeypatch):
    clock = Clock(monkeypatch)
    url = f"{gcs_bucket}/gpt-2/models/124M/hparams.json"
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    message = str(info.value)
    assert message.startswith(f"could not fetch {url}: NotFound: 404 ") and message.endswith(
        f" (not retried); cache path {files.cache_path(url)}")
    assert info.value.status == 404 and clock.waits == []
    assert not os.path.exists(files.cache_path(url)) and leftovers(cache) == []
    assert not files.exists(url)
    upload(url, b"{}")
    assert files.exists(url) and not os.path.exists(files.cache_path(url))  # asked, not fetched


@pytest.mark.parametrize("error, transient", [
    ("ServiceUnavailable", True), ("TooManyRequests", True), ("InternalServerError", True),
    ("RequestRangeNotSatisfiable", True), ("Timeout", True), ("ChunkedEncodingError", True),
    ("ConnectionReset", True), ("Forbidden", False), ("NotFound", False), ("TransportError", False)])
def test_gcs_failures_are_retried_or_not_by_kind(gcs_bucket, cache, monkeypatch, error, transient):
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    clock = Clock(monkeypatch)
    raised = {"ServiceUnavailable": api_exceptions.ServiceUnavailable("busy"),
              "TooManyRequests": api_exceptions.TooManyRequests("slow down"),
              "InternalServerError": api_exceptions.InternalServerError("oops"),
              "RequestRangeNotSatisfiable": api_exceptions.RequestRangeNotSatisfiable("range"),
              "Timeout": requests.exceptions.ReadTimeout("read timed out"),
              "ChunkedEncodingError": requests.exceptions.ChunkedEncodingError("broken chunk"),
              "ConnectionReset": requests.exceptions.ConnectionError("connection reset by peer"),
              "Forbidden": api_exceptions.Forbidden("no access"),
              "NotFound": api_exceptions.NotFound("gone"),
              "TransportError": auth_exceptions.TransportError("no route to the token server")}[error]
    url = f"{gcs_bucket}/data/file.bin"
    upload(url, b"payload")
    pending = failing_first(monkeypatch, storage.Blob, "download_to_file", [raised])
    if transient:
        with open(files.local_path(url), "rb") as f:
            assert f.read() == b"payload"
        assert pending == [] and len(clock.waits) == 1
        return
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    message = str(info.value)
    if error == "TransportError":
        assert message == (f"could not fetch {url}: host unreachable (offline?): no route to the token server; "
                           f"cache path {files.cache_path(url)}")
    else:
        assert message == (f"could not fetch {url}: {error}: {raised.code} {raised.message} (not retried); cache "
                           f"path {files.cache_path(url)}")
        assert info.value.status == raised.code
    assert clock.waits == [] and not os.path.exists(files.cache_path(url)) and leftovers(cache) == []


def test_gcs_a_dropped_connection_without_a_reason_is_retried_and_a_bare_refusal_is_not(gcs_bucket, cache,
                                                                                       monkeypatch):
    import urllib3
    clock = Clock(monkeypatch)
    url = f"{gcs_bucket}/data/file.bin"
    upload(url, b"payload")
    failing_first(monkeypatch, storage.Blob, "download_to_file", [requests.exceptions.ConnectionError()])
    with open(files.local_path(url), "rb") as f:
        assert f.read() == b"payload"
    assert len(clock.waits) == 1
    os.remove(files.cache_path(url))
    refused = urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: [Errno 111] refused")
    failing_first(monkeypatch, storage.Blob, "download_to_file", [requests.exceptions.ConnectionError(refused)])
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    assert str(info.value) == (f"could not fetch {url}: host unreachable (offline?): None: Failed to establish a new "
                               f"connection: [Errno 111] refused; cache path {files.cache_path(url)}")
    assert len(clock.waits) == 1  # not retried


def test_an_unreachable_cloud_storage_fails_at_once_everywhere(tiny_run, cache, monkeypatch):
    clock = Clock(monkeypatch)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", CLOSED_PORT)  # nothing answers there
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    tiny_run.save(1)
    url = "gs://bucket/runs/r"
    staging = os.path.join(str(cache), "staging", "bucket", "runs", "r")
    for attempt, expected in [
            (lambda: files.local_path(f"{url}/hparams.json"),
             f"could not fetch {url}/hparams.json: host unreachable (offline?): "),
            (lambda: files.exists(f"{url}/hparams.json"),
             f"could not check whether {url}/hparams.json exists: host unreachable (offline?): "),
            (lambda: files.staging_dir(url), f"could not list {url}: host unreachable (offline?): "),
            (lambda: files.remote_dir_exists(url), f"could not list {url}: host unreachable (offline?): "),
            (lambda: files.sync_up(tiny_run.directory, url),
             f"could not upload to {url}/hparams.json: host unreachable (offline?): ")]:
        with pytest.raises(files.FileFetchError) as info:
            attempt()
        assert str(info.value).startswith(expected), str(info.value)
    assert str(info.value).endswith(f"; local path {os.path.join(tiny_run.directory, 'hparams.json')}")
    assert clock.waits == [] and leftovers(cache) == []
    assert not os.path.exists(files.cache_path(f"{url}/hparams.json"))
    assert not os.listdir(staging) if os.path.exists(staging) else True


def test_an_object_deleted_behind_the_runs_back_is_no_error(gcs_bucket, tiny_run, cache):
    url = f"{gcs_bucket}/run"
    tiny_run.save(1)
    tiny_run.save(2)
    files.sync_up(tiny_run.directory, url)
    tiny_run.save(3)  # checkpoint 1 dropped locally: its objects are deleted at the next sync
    bucket, _, prefix = url[len("gs://"):].partition("/")
    storage.Client(project=None).bucket(bucket).blob(f"{prefix}/model/checkpoints/model.ckpt-1.index").delete()
    assert sorted(files.sync_up(tiny_run.directory, url).deleted) == sorted(ckpt(1))
    assert not ckpt(1) & set(remote_objects(url))


def test_a_sync_record_that_is_unreadable_or_of_another_run_uploads_everything(gcs_bucket, tiny_run, cache):
    url = f"{gcs_bucket}/run"
    tiny_run.save(1)
    everything = set(files.sync_up(tiny_run.directory, url).uploaded)
    record = os.path.join(tiny_run.directory, files.SYNC_RECORD_NAME)
    for content in ["not json", "[1, 2]", json.dumps({"save_dir": f"{gcs_bucket}/other", "files": {"x": {}}}),
                    json.dumps({"save_dir": url})]:
        with open(record, "w") as f:
            f.write(content)
        assert set(files.sync_up(tiny_run.directory, url).uploaded) == everything
        with open(record) as f:
            assert json.load(f)["save_dir"] == url  # rewritten for this run
    assert files.sync_up(tiny_run.directory, url) == files.Synced([], [])
    os.remove(record)
    assert set(files.sync_up(tiny_run.directory, url).uploaded) == everything


def test_sync_up_needs_a_directory(gcs_bucket, tmp_path):
    missing = str(tmp_path / "nothing")
    with pytest.raises(ValueError) as info:
        files.sync_up(missing, f"{gcs_bucket}/run")
    assert str(info.value) == f"cannot upload {missing} to {gcs_bucket}/run: {missing} is not a directory"


def test_staging_skips_folder_placeholders_and_refuses_unstorable_object_names(gcs_bucket, cache):
    url = f"{gcs_bucket}/exp/run"
    upload(f"{url}/hparams.json", b"{}")
    upload(f"{url}/a/", b"")  # a "folder" made in the web console (listed before the files)
    upload(f"{url}/tb/events", b"e")
    upload(f"{url}2/hparams.json", b"[]")  # another run whose name starts alike: not part of this one
    staging = files.staging_dir(url)
    assert files._local_files(staging) == ["hparams.json", "tb/events"]
    with open(os.path.join(staging, "hparams.json")) as f:
        assert f.read() == "{}"
    for bad in ["a//b", "./c"]:  # (the emulator cannot store a name with '..' in it)
        bucket, _, _ = url[len("gs://"):].partition("/")
        blob = storage.Client(project=None).bucket(bucket).blob(f"exp/run/{bad}")
        blob.upload_from_string(b"x")
        with pytest.raises(ValueError) as info:
            files.staging_dir(url)
        assert str(info.value) == (f"{url}: object 'exp/run/{bad}' cannot be stored as a local file (empty, '.' or "
                                   f"'..' path component); rename or remove it")
        blob.delete()


def test_local_files_leave_out_the_sync_record_and_unfinished_writes(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ["z.json", "a.txt", "b/c/d.bin", "b/c/d.bin.1234.part", files.SYNC_RECORD_NAME, "b/" +
                 files.SYNC_RECORD_NAME]:
        (tmp_path / name).write_text("x")
    assert files._local_files(str(tmp_path)) == ["a.txt", "z.json", f"b/{files.SYNC_RECORD_NAME}", "b/c/d.bin"]


@pytest.mark.parametrize("url, message", [
    ("https://example.com/run", "'https://example.com/run': runs are saved to a local directory or a gs://BUCKET/PATH "
                                "URL (https:// cannot be written)"),
    ("gs://bucket/a/../b", "'gs://bucket/a/../b' is not a valid save directory (expected gs://BUCKET/PATH, without "
                           "'.', '..', '?' or '#')"),
    ("gs://bucket/./b", None), ("gs://bucket/run?x=1", None), ("gs://bucket/run#top", None), ("gs:///run", None)])
def test_save_directory_urls_are_checked(url, message):
    message = message or (f"{url!r} is not a valid save directory (expected gs://BUCKET/PATH, without '.', '..', "
                          f"'?' or '#')")
    for call in [files._run_location, files.remote_dir_exists, files.staging_dir]:
        with pytest.raises(ValueError) as info:
            call(url)
        assert str(info.value) == message
    assert files._run_location("gs://bucket//runs/x/") == ("bucket", "runs/x")
    assert files._run_location("gs://bucket") == ("bucket", "")


def test_staging_names_the_object_or_listing_that_failed(gcs_bucket, cache, monkeypatch):
    from google.api_core import exceptions as api_exceptions
    clock = Clock(monkeypatch)
    url = f"{gcs_bucket}/exp/run"
    upload(f"{url}/hparams.json", b"{}")
    staging = os.path.join(str(cache), "staging", gcs_bucket[len("gs://"):], "exp", "run")
    failing_first(monkeypatch, storage.Blob, "download_to_file", [api_exceptions.ServiceUnavailable("busy")] * 3)
    with pytest.raises(files.FileFetchError) as info:
        files.staging_dir(url)
    assert str(info.value) == (f"could not fetch {url}/hparams.json after 3 attempts, last error: ServiceUnavailable: "
                               f"503 busy; cache path {os.path.join(staging, 'hparams.json')}")
    assert (info.value.url, info.value.cache_path) == (f"{url}/hparams.json", os.path.join(staging, "hparams.json"))
    assert leftovers(cache) == [] and not os.path.exists(os.path.join(staging, "hparams.json"))
    clock.waits.clear()  # (the three failures are spent: downloads work again)
    failing_first(monkeypatch, storage.Client, "list_blobs", [api_exceptions.TooManyRequests("slow down")] * 3)
    with pytest.raises(files.FileFetchError) as info:
        files.staging_dir(url)
    assert str(info.value) == (f"could not list {url} after 3 attempts, last error: TooManyRequests: 429 slow down; "
                               f"local path {staging}")
    assert len(clock.waits) == 2


def test_exists_that_keeps_failing_names_the_url_and_the_cache_path(server, cache, monkeypatch):
    Clock(monkeypatch)
    server.fail_503["/busy.json"] = 100
    url = server.url("/busy.json")
    with pytest.raises(files.FileFetchError) as info:
        files.exists(url)
    assert str(info.value) == (f"could not fetch {url} after 3 attempts, last error: HTTP 503 Service Unavailable; "
                               f"cache path {files.cache_path(url)}")
    assert server.requests["HEAD", "/busy.json"] == 3 and server.gets("/busy.json") == 0


@pytest.fixture
def silent_storage(monkeypatch, tmp_path):
    """$STORAGE_EMULATOR_HOST points at a server that takes every request and answers nothing for 3 s; short
    connect and read timeouts."""
    class Silent(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer_nothing(self):
            time.sleep(3)
            self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = answer_nothing

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "READ_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(files, "RETRIES", 1)
    Clock(monkeypatch)
    yield
    httpd.shutdown()
    httpd.server_close()


def test_a_cloud_storage_that_never_answers_times_out_each_call_and_is_retried(silent_storage, tiny_run):
    tiny_run.save(1)
    url = "gs://bucket/runs/r"
    start = time.monotonic()
    for name, attempt in [("fetch", lambda: files.local_path(f"{url}/hparams.json")),
                          ("exists", lambda: files.exists(f"{url}/hparams.json")),
                          ("list", lambda: files.remote_dir_exists(url)),
                          ("staging", lambda: files.staging_dir(url)),
                          ("upload", lambda: files.sync_up(tiny_run.directory, url))]:
        with pytest.raises(files.FileFetchError) as info:
            attempt()
        assert " after 2 attempts, last error: " in str(info.value) and "Timeout" in str(info.value), (name, info.value)
    assert time.monotonic() - start < 20  # each attempt gave up after the read timeout, not the server's 3 s


def test_a_deletion_that_keeps_failing_names_the_object_after_the_new_state_is_up(gcs_bucket, tiny_run, cache,
                                                                                 monkeypatch):
    from google.api_core import exceptions as api_exceptions
    Clock(monkeypatch)
    url = f"{gcs_bucket}/run"
    tiny_run.save(1)
    tiny_run.save(2)
    files.sync_up(tiny_run.directory, url)
    tiny_run.save(3)  # checkpoint 1 is dropped: its objects are to be deleted
    failing_first(monkeypatch, storage.Blob, "delete", [api_exceptions.ServiceUnavailable("busy")] * 3)
    with pytest.raises(files.FileFetchError) as info:
        files.sync_up(tiny_run.directory, url)
    first = sorted(ckpt(1))[0]
    assert str(info.value) == (f"could not delete {url}/{first} after 3 attempts, last error: ServiceUnavailable: "
                               f"503 busy")  # no local path: the file is gone here
    assert (info.value.url, info.value.cache_path) == (f"{url}/{first}", None)
    assert latest_named(remote_text(files.join(url, STATE))) == "model.ckpt-3"  # uploads were done first
    assert sorted(files.sync_up(tiny_run.directory, url).deleted) == sorted(ckpt(1))  # the next sync finishes
    assert not ckpt(1) & set(remote_objects(url))


def test_save_directory_errors_that_are_not_retried_say_what_and_where(gcs_bucket, tiny_run, cache, tmp_path,
                                                                       monkeypatch):
    from google.api_core import exceptions as api_exceptions
    clock = Clock(monkeypatch)
    url = f"{gcs_bucket}/run"
    tiny_run.save(1)
    tiny_run.save(2)
    files.sync_up(tiny_run.directory, url)
    tiny_run.save(3)
    failing_first(monkeypatch, storage.Blob, "delete", [api_exceptions.Forbidden("no access")])
    with pytest.raises(files.FileFetchError) as info:
        files.sync_up(tiny_run.directory, url)
    first = sorted(ckpt(1))[0]
    # a refusal: no bucket hint (that is for 404), no local path (the file is gone here), not retried
    assert str(info.value) == f"could not delete {url}/{first}: Forbidden: 403 no access (not retried)"
    assert (info.value.url, info.value.cache_path, info.value.status) == (f"{url}/{first}", None, 403)
    assert clock.waits == []

    missing = "gs://no-such-bucket-lmhp/run"
    staging = os.path.join(str(cache), "staging", "no-such-bucket-lmhp", "run")
    with pytest.raises(files.FileFetchError) as info:
        files.staging_dir(missing)
    assert str(info.value).startswith(f"could not list {missing}: NotFound: 404 ")
    assert str(info.value).endswith(f" (not retried) (does the bucket gs://no-such-bucket-lmhp exist?); local path "
                                    f"{staging}")
    assert (info.value.url, info.value.cache_path, info.value.status) == (missing, staging, 404)

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # real Cloud Storage, and no usable credentials
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    staging = os.path.join(str(cache), "staging", "some-bucket", "run")
    with pytest.raises(files.FileFetchError) as info:
        files.staging_dir("gs://some-bucket/run")
    assert str(info.value).startswith("could not list gs://some-bucket/run: no Google Cloud credentials (")
    assert str(info.value).endswith("; run `gcloud auth application-default login` or set GOOGLE_APPLICATION_"
                                    f"CREDENTIALS to a service account key file; local path {staging}")
    assert (info.value.url, info.value.cache_path, info.value.status) == ("gs://some-bucket/run", staging, None)


# ----- gs:// through a proxy in front of the emulator: credentials, per-call timeouts, names it cannot hold -------

class StorageProxy:
    """Stands between google-cloud-storage and the emulator: forwards each request and its answer, recording
    (method, path, Authorization header, body) of each; answers nothing for 3 s to a request that `stall(method, path)`
    picks; `canned[path]` answers a GET of that path (its query aside) with that JSON instead of the emulator."""

    def __init__(self, emulator_url):
        self.emulator_url = emulator_url
        self.calls = []
        self.stall = lambda method, path: False
        self.canned = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.calls.append((self.command, self.path, self.headers.get("Authorization"), body))
                path = self.path.partition("?")[0]
                if proxy.stall(self.command, path):
                    time.sleep(3)
                    self.close_connection = True
                elif self.command == "GET" and path in proxy.canned:
                    self.reply(200, {"Content-Type": "application/json"}, json.dumps(proxy.canned[path]).encode())
                else:
                    hop = ("host", "authorization", "content-length", "connection", "accept-encoding")
                    answer = requests.request(self.command, proxy.emulator_url + self.path, data=body, timeout=30,
                                              headers={n: v for n, v in self.headers.items() if n.lower() not in hop},
                                              allow_redirects=False)
                    hop = ("content-length", "content-encoding", "transfer-encoding", "connection")
                    self.reply(answer.status_code, {n: v for n, v in answer.headers.items() if n.lower() not in hop},
                               answer.content.replace(proxy.emulator_url.encode(), proxy.url.encode()))  # links

            def reply(self, status, headers, body):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def authorizations(self, call, objects):
        """The Authorization headers of the requests that `call()` made about objects named `objects`... (the
        library may ask for the bucket's metadata on its own time)."""
        self.calls.clear()
        call()
        return {authorization for _, path, authorization, body in self.calls
                if re.search(rf"[/=\"]{objects}", urllib.parse.unquote(path) + body.decode("latin-1"))}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def storage_proxy(gcs_emulator, gcs_bucket, monkeypatch):
    """A StorageProxy in front of the emulator; $STORAGE_EMULATOR_HOST points at it."""
    proxy = StorageProxy(gcs_emulator.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    yield proxy
    proxy.close()


def test_gcs_reads_are_anonymous_and_save_directories_use_the_login_unless_a_key_file_is_named(
        storage_proxy, gcs_bucket, cache, tmp_path, monkeypatch):
    for name in ["models/hparams.json", "models/encoder.json", "run/hparams.json"]:
        upload(f"{gcs_bucket}/{name}", b"{}")
    # what `gcloud auth application-default login` leaves, with an access token that stays valid (no refresh)
    login = tmp_path / "gcloud" / "application_default_credentials.json"
    login.parent.mkdir()
    login.write_text(json.dumps({"type": "authorized_user", "client_id": "lmhp-test", "client_secret": "secret",
                                 "refresh_token": "refresh", "token": "token-of-the-login",
                                 "expiry": "2999-01-01T00:00:00Z"}))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(login.parent))
    monkeypatch.setenv("PATH", str(login.parent))  # no `gcloud` for google-auth to ask for a project (0.5 s a client)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # an endpoint that takes credentials, as Cloud Storage itself
    monkeypatch.setenv("API_ENDPOINT_OVERRIDE", storage_proxy.url)
    bearer = "Bearer token-of-the-login"

    # a public model is read without an account (no credentials looked up)
    models, run = f"{gcs_bucket}/models", f"{gcs_bucket}/run"
    assert storage_proxy.authorizations(lambda: files.read_json(f"{models}/hparams.json"), "models/") == {None}
    assert storage_proxy.authorizations(lambda: files.exists(f"{models}/missing.json"), "models/") == {None}
    # a save directory is the user's: listed, staged (each object downloaded) and written with the login
    assert storage_proxy.authorizations(lambda: files.remote_dir_exists(run), "run/") == {bearer}
    assert storage_proxy.authorizations(lambda: files.staging_dir(run), "run/") == {bearer}
    staging = files.staging_dir(run)
    with open(os.path.join(staging, "hparams.json")) as f:
        assert f.read() == "{}"
    files.write_text_atomic(os.path.join(staging, "progress.json"), "[]")
    assert storage_proxy.authorizations(lambda: files.sync_up(staging, run), "run/") == {bearer}
    # a key file named in $GOOGLE_APPLICATION_CREDENTIALS is used for reading too (private models)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(login))
    assert storage_proxy.authorizations(lambda: files.read_json(f"{models}/encoder.json"), "models/") == {bearer}


def test_gcs_downloads_and_deletions_give_up_at_the_read_timeout(storage_proxy, gcs_bucket, cache, tmp_path,
                                                                 monkeypatch):
    Clock(monkeypatch)
    monkeypatch.setattr(files, "READ_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(files, "RETRIES", 1)
    url = f"{gcs_bucket}/models/model.ckpt.index"
    upload(url, b"index")
    run = f"{gcs_bucket}/run"
    local = tmp_path / "local"
    local.mkdir()
    (local / "model.ckpt-1.index").write_bytes(b"x")
    files.sync_up(local, run)
    os.remove(local / "model.ckpt-1.index")  # dropped by the Saver: its object is deleted at the next sync
    # the object's metadata and the listing answer; its bytes and the deletion never do
    storage_proxy.stall = lambda method, path: method == "DELETE" or path.startswith("/download/")
    start = time.monotonic()
    with pytest.raises(files.FileFetchError) as info:
        files.local_path(url)
    assert str(info.value).startswith(f"could not fetch {url} after 2 attempts, last error: ReadTimeout: "), \
        str(info.value)
    with pytest.raises(files.FileFetchError) as info:
        files.sync_up(local, run)
    assert str(info.value).startswith(f"could not delete {run}/model.ckpt-1.index after 2 attempts, last error: "
                                      f"ReadTimeout: "), str(info.value)
    assert time.monotonic() - start < 2.5  # four attempts of 0.3 s, none left to the library's own retries


def test_gcs_staging_refuses_an_object_name_that_leads_out_of_the_run(storage_proxy, gcs_bucket, cache):
    bucket = gcs_bucket[len("gs://"):]
    url = f"{gcs_bucket}/run"
    # the emulator cannot hold such a name, Cloud Storage can: the listing is the proxy's
    storage_proxy.canned[f"/storage/v1/b/{bucket}/o"] = {"kind": "storage#objects", "items": [
        {"kind": "storage#object", "bucket": bucket, "name": "run/../escaped", "size": "1", "md5Hash": "AAAA"}]}
    with pytest.raises(ValueError) as info:
        files.staging_dir(url)
    assert str(info.value) == (f"{url}: object 'run/../escaped' cannot be stored as a local file (empty, '.' or "
                               f"'..' path component); rename or remove it")
    assert not os.path.exists(os.path.join(str(cache), "staging", bucket, "escaped"))
