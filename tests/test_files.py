"""File layer against a real HTTP server on 127.0.0.1: cache layout and reuse, retries, truncated bodies,
fail-fast errors, atomic writes, and the once-per-machine download under MPI."""

import collections
import http.server
import json
import os
import socket
import threading
import time

import pytest

from lm_human_preferences.utils import files

from mpi_programs import rank_lines, run


class FileServer:
    """Serves `files`; `fail_503[path]` answers 503 that many times first; `truncate[path]` sends the
    Content-Length of the whole file but closes after half of it, that many times. Counts requests."""

    def __init__(self):
        self.files = {}
        self.fail_503 = collections.Counter()
        self.truncate = collections.Counter()
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
                        self.wfile.write(body[: len(body) // 2] if truncate else body)
                        self.wfile.flush()
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
    with pytest.raises(files.FileFetchError, match="unreachable"):
        files.exists(url)


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


# ----- MPI: once per machine ------------------------------------------------------------------------------

def fetch_on_two_ranks(server, cache, path):
    result = run(2, "fetch.py", server.url(path),
                 env={"LMHP_CACHE_DIR": str(cache), "LMHP_FETCH_RETRIES": "0"})
    assert result.returncode == 0, result.stdout
    reports = {r: json.loads(line) for r, line in rank_lines(result.stdout, "RESULT").items()}
    assert sorted(reports) == [0, 1], result.stdout
    return reports


def test_mpi_ranks_on_one_machine_download_once(server, cache):
    server.files["/shared/vocab.bpe"] = b"merges " * 1000
    reports = fetch_on_two_ranks(server, cache, "/shared/vocab.bpe")
    assert server.gets("/shared/vocab.bpe") == 1
    for report in reports.values():
        assert report["path"] == str(cache / "http" / server.host.replace(":", "_") / "shared" / "vocab.bpe")
        assert report["text"] == "merges " * 1000


def test_mpi_error_of_the_downloading_rank_reaches_the_others(server, cache):
    reports = fetch_on_two_ranks(server, cache, "/missing/encoder.json")
    assert server.gets("/missing/encoder.json") == 1
    for report in reports.values():
        assert server.url("/missing/encoder.json") in report["error"] and "HTTP 404" in report["error"]
    assert "fetched by rank 0 of this machine" in reports[1]["error"]
