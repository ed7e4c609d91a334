"""File layer against a real HTTP server on 127.0.0.1: cache layout and reuse, retries, truncated bodies,
fail-fast errors, atomic writes, and the once-per-machine download under MPI; gs:// save directories against a
local Cloud Storage emulator: round trip of a checkpoint, upload order, changed files only, deletions, staging."""

import collections
import contextlib
import http.server
import json
import os
import re
import resource
import signal
import socket
import sys
import threading
import time

import numpy as np
import pytest
import requests
import tensorflow as tf
from google.cloud import storage

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


def test_a_download_says_what_it_fetches_and_where_on_stderr(server, cache, capfd):
    server.files["/run/hparams.json"] = b"{}"
    target = files.local_path(server.url("/run/hparams.json"))
    out, err = capfd.readouterr()
    assert f"downloading {server.url('/run/hparams.json')} -> {target}" in err.splitlines()
    assert "downloading" not in out  # stdout stays for the program's results
    files.local_path(server.url("/run/hparams.json"))
    assert "downloading" not in capfd.readouterr().err  # a cached file is not fetched again


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
    assert not files.remote_dir_exists(url)

    synced = files.sync_up(tiny_run.directory, url)
    assert set(synced.uploaded) == {"hparams.json", "tb/events.out.tfevents.1", STATE} | ckpt(1)
    assert synced.uploaded[-1] == STATE and synced.deleted == []
    assert set(remote_objects(url)) == set(synced.uploaded)  # the sync record stays local
    assert files.remote_dir_exists(url) and files.remote_dir_exists(f"{gcs_bucket}/runs")
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
    with pytest.raises(files.FileFetchError, match=r"gs://some-bucket/run: no Google Cloud credentials.*gcloud auth"):
        files.sync_up(tiny_run.directory, "gs://some-bucket/run")

    import google.cloud
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # as if google-cloud-storage were not installed
    monkeypatch.delattr(google.cloud, "storage")
    with pytest.raises(files.FileFetchError, match="gs://some-bucket/run.*pip install google-cloud-storage"):
        files.remote_dir_exists("gs://some-bucket/run")
