"""Files from local disk, `https://`/`http://` and `gs://`.

Wherever a path is accepted, a URL is too. A remote file is fetched once into a disk cache and then read
locally; the cache keeps the remote layout, `cache_dir()/<scheme>/<host or bucket>/<path>`, so files that
are siblings remotely are siblings in the cache (a TensorFlow checkpoint reader needs `model.ckpt.index`
next to `model.ckpt.data-*`).

* A cached file is used without touching the network.
* Downloads go to a temporary file in the target directory, are checked against Content-Length, and are
  renamed into place only when complete: a half-written file is never taken for a good cache entry.
* Transient failures (5xx, 429, 408, connection reset, read timeout, truncated body) are retried with
  exponential backoff and jitter; a definitive answer (404, 403, ...) fails at once. A host that cannot be
  reached at all (offline: no DNS, connection refused, connect timeout) also fails at once, so an offline run
  stops within seconds. Errors are :class:`FileFetchError` naming the URL and the cache path.
* Files read together (a model's, a run's) are fetched within :func:`fetching_together`: when one cannot be
  fetched, the error (:class:`MissingFiles`, a ValueError too) lists every file of the set not in the cache,
  with the cache path to copy it to, so that they can all be fetched elsewhere and copied in.
* A download shows progress on stderr, on MPI rank 0 only: a bar updated in place (done/total bytes, rate,
  time left) while stderr is a terminal, and once the file is complete one line,
  `downloaded URL -> CACHE_PATH (SIZE in TIME, RATE)`, which replaces the bar (the only output in logs).
* Under MPI, :func:`local_path` is collective: one rank per machine downloads (fetched once per
  machine), the others receive its result or its error.

Runs can be saved to `gs://BUCKET/PATH` (:func:`staging_dir`, :func:`sync_up`). Training writes to a local staging
directory; after each save the run is uploaded, the TensorFlow checkpoint state files (`checkpoint`) last, so that a
reader of the bucket never sees a state file naming a checkpoint whose objects are not all there.

Settings (module attributes, initialised from the environment): `RETRIES` ($LMHP_FETCH_RETRIES),
`BACKOFF_SECONDS` ($LMHP_FETCH_BACKOFF_SECONDS), `MAX_BACKOFF_SECONDS`, `CONNECT_TIMEOUT_SECONDS`,
`READ_TIMEOUT_SECONDS`.
"""

import base64
import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
import time
import urllib.parse
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

REMOTE_SCHEMES = ("https", "http", "gs")


def _env_number(name, default, kind):
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not a valid {kind.__name__}") from None


RETRIES = _env_number("LMHP_FETCH_RETRIES", 5, int)  # extra attempts after a transient failure
BACKOFF_SECONDS = _env_number("LMHP_FETCH_BACKOFF_SECONDS", 1.0, float)  # first wait; doubles each retry
MAX_BACKOFF_SECONDS = 60.0  # cap on one wait (also on a server's Retry-After)
CONNECT_TIMEOUT_SECONDS = 5.0  # no TCP connection within this: the host is unreachable, fail fast
READ_TIMEOUT_SECONDS = 60.0  # silence on an open connection this long: transient, retried
_CHUNK_BYTES = 1 << 20
_STREAM_CHUNK_BYTES = 1 << 16  # a download is read this much at a time: the progress bar moves on a slow link


class FileFetchError(OSError):
    """A remote file could not be fetched (or a run not listed or uploaded). The message names the URL and the
    local path."""

    def __init__(self, message, *, url=None, cache_path=None, status=None):
        super().__init__(message)
        self.url = url
        self.cache_path = cache_path
        self.status = status  # HTTP status when there was one

    def __str__(self):
        return self.args[0]

    def __reduce__(self):  # keep the keyword attributes when pickled
        return (_rebuild_fetch_error, (self.args[0], self.url, self.cache_path, self.status))


def _rebuild_fetch_error(message, url, cache_path, status):
    return FileFetchError(message, url=url, cache_path=cache_path, status=status)


class MissingFiles(FileFetchError, ValueError):
    """A file of a set read together (a model's, a run's) could not be fetched. The message is the fetch error's,
    then every file of the set that is not in the cache, each with the cache path to copy it to. A ValueError
    too: the command lines show it as their one-line `error: ...`. `missing`: [(URL, cache path)]."""

    def __init__(self, error: FileFetchError, what: str, missing: List[Tuple[str, str]]):
        count = f"{len(missing)} file{'s' if len(missing) != 1 else ''}"
        listing = ", ".join(f"{url} -> {path}" for url, path in missing)
        super().__init__(f"{error}; {count} of {what} not in the cache (fetch them where there is a network and copy "
                         f"each to the path after its URL, or point $LMHP_CACHE_DIR at a cache holding them): "
                         f"{listing}", url=error.url, cache_path=error.cache_path, status=error.status)
        self.missing = missing


def not_cached(urls: Iterable[str]) -> List[Tuple[str, str]]:
    """(URL, cache path) of each remote URL of `urls` whose file is not in the cache, in the order given."""
    return [(url, cache_path(url)) for url in urls if is_remote(url) and not os.path.isfile(cache_path(url))]


@contextlib.contextmanager
def fetching_together(what: str, missing: Callable[[], List[Tuple[str, str]]]):
    """Within it, a FileFetchError becomes MissingFiles, listing `missing()` (called then: the (URL, cache path)
    of the files of `what` not in the cache) and the URL that failed if it is not among them."""
    try:
        yield
    except MissingFiles:
        raise
    except FileFetchError as error:
        listed = missing()
        if error.url is not None and error.cache_path is not None and error.url not in dict(listed):
            listed.insert(0, (error.url, error.cache_path))  # a file outside the set: not in the cache either
        raise MissingFiles(error, what, listed) from None


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds, if any."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class _Permanent(Exception):
    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


# ----- paths -----------------------------------------------------------------------------------------------

def _scheme(path: str) -> str:
    head, sep, _ = path.partition("://")
    return head.lower() if sep else ""


def is_remote(path) -> bool:
    """True for https://, http:// and gs:// URLs."""
    return _scheme(os.fspath(path)) in REMOTE_SCHEMES


def is_gcs(path) -> bool:
    """True for gs:// URLs (Google Cloud Storage)."""
    return _scheme(os.fspath(path)) == "gs"


def join(base, *parts) -> str:
    """Join path components; URLs always with '/', local paths with os.path.join."""
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *map(os.fspath, parts))
    result = base
    for part in map(os.fspath, parts):
        if not part:
            continue
        result = result.rstrip("/") + "/" + part.lstrip("/")
    return result


def cache_dir() -> str:
    """$LMHP_CACHE_DIR, default ~/.cache/lm-human-preferences."""
    return os.path.expanduser(os.environ.get("LMHP_CACHE_DIR") or "~/.cache/lm-human-preferences")


def cache_path(url: str) -> str:
    """Where `url` is (or would be) cached: cache_dir()/<scheme>/<host or bucket>/<path of the URL>."""
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    # ':' of host:port is not allowed in file names everywhere.
    host = parsed.netloc.rpartition("@")[2].replace(":", "_")
    parts = [urllib.parse.unquote(p) for p in parsed.path.split("/") if p]
    if not host or not parts or parsed.path.endswith("/"):
        raise ValueError(f"{url!r} does not name a file (expected {scheme}://HOST/PATH/FILE)")
    # Checked after unquoting, so that an escaped '%2F..' cannot lead out of the cache directory.
    if any(p in (".", "..") or "/" in p or "\\" in p or "\0" in p for p in parts):
        raise ValueError(f"{url!r}: '.', '..' and escaped '/' path components are not accepted in URLs")
    if parsed.query:
        # Different queries are different files; keep the name readable and siblings together.
        parts[-1] += "_q" + hashlib.sha1(parsed.query.encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), scheme, host, *parts)


# ----- public reading API ----------------------------------------------------------------------------------

def local_path(path, *, collective: bool = True) -> str:
    """A local file path for `path`: local paths as they are, remote files fetched into the cache.

    Under MPI with several ranks this is COLLECTIVE for remote paths when `collective` is true: every rank
    must call it with the same path. Rank 0 of each machine fetches; the others wait for its result and raise
    the same FileFetchError if it failed. Pass collective=False from code that only one rank runs.
    """
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.expanduser(path)
    target = cache_path(path)
    _once_per_machine(lambda: _ensure_cached(path, target), path, target, collective)
    return target


def _once_per_machine(work, url, target, collective):
    """Run `work()` on rank 0 of this machine only (all ranks when not `collective` or without MPI); the other
    ranks wait for it and raise FileFetchError with its error's message and HTTP status if it failed: the same
    message on every rank, so that a job that relays its ranks' errors shows it once."""
    local = None
    if collective:
        from lm_human_preferences.utils import mpi
        local = mpi.local_comm()
    if local is None:
        work()
        return
    if local.Get_rank() == 0:
        try:
            work()
        except BaseException as e:
            # release the other ranks with the reason, then fail here too
            local.bcast((_describe(e), getattr(e, "status", None)), root=0)
            raise
        local.bcast(None, root=0)
        return
    error = local.bcast(None, root=0)
    if error is not None:
        message, status = error
        raise FileFetchError(message, url=url, cache_path=target, status=status)


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, FileFetchError) else f"{type(error).__name__}: {error}"


def exists(path) -> bool:
    """Does the file exist? Remote files: True when cached, else asks the server (HEAD / object metadata)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.exists(os.path.expanduser(path))
    target = cache_path(path)
    if os.path.isfile(target):
        return True
    try:
        return _attempts(path, target, lambda: _remote_exists(path))
    except _Permanent as e:
        raise FileFetchError(f"could not check whether {path} exists: {e}; cache path {target}",
                             url=path, cache_path=target, status=e.status) from None


def read_text(path, *, collective: bool = True) -> str:
    with open(local_path(path, collective=collective), encoding="utf-8") as f:
        return f.read()


def read_json(path, *, collective: bool = True):
    text = read_text(path, collective=collective)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_text_atomic(path, text: str):
    """Write a local file so that readers see the old content or the new one, never a part."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path, data: bytes):
    """Write a local file so that readers see the old content or the new one, never a part (images, say)."""
    path = os.fspath(path)
    if is_remote(path):
        raise ValueError(f"cannot write {path}: only local paths can be written (save to a directory, then upload)")
    with _atomic_file(os.path.expanduser(path)) as f:
        f.write(data)


def write_new_text_atomic(path, text: str):
    """Write a local file that must not exist yet, atomically: FileExistsError when it exists, also when another
    process made it meanwhile (an output is never overwritten), and never a part of it."""
    path = os.fspath(path)
    if is_remote(path):
        raise ValueError(f"cannot write {path}: only local paths can be written (save to a directory, then upload)")
    with _atomic_file(os.path.expanduser(path), exclusive=True) as f:
        f.write(text.encode("utf-8"))


class _atomic_file:
    """Binary file open in the target's directory under a temporary name; renamed into place on success
    (exclusive: linked into place, FileExistsError when the target exists)."""

    def __init__(self, path, exclusive: bool = False):
        self.path = path
        self.exclusive = exclusive

    def __enter__(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(self.path) + ".", suffix=".part")
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            try:
                if exc_type is None:
                    self.file.flush()
                    os.fsync(self.file.fileno())
            finally:
                self.file.close()  # also when flush or fsync failed: no descriptor is left open
            if exc_type is None:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
                if self.exclusive:
                    os.link(self.tmp, self.path)  # atomic, and fails when the target exists
                else:
                    os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
        return False


# ----- fetching --------------------------------------------------------------------------------------------

def _ensure_cached(url: str, target: str):
    if os.path.isfile(target):
        return
    try:
        _attempts(url, target, lambda: _download(url, target))
    except _Permanent as e:
        raise FileFetchError(f"could not fetch {url}: {e}; cache path {target}",
                             url=url, cache_path=target, status=e.status) from None


def _attempts(url, target, attempt, action="fetch"):
    """Run `attempt()` with retries on _Transient; after the last one raise FileFetchError.
    `action` names the work in messages: "could not {action} {url} ..."."""
    retries = max(int(RETRIES), 0)
    for number in range(retries + 1):
        try:
            return attempt()
        except _Transient as e:
            if number == retries:
                where = f"; {'cache path' if action == 'fetch' else 'local path'} {target}" if target else ""
                attempts = f"{retries + 1} attempt{'s' if retries else ''}"
                raise FileFetchError(f"could not {action} {url} after {attempts}, last error: {e}{where}",
                                     url=url, cache_path=target) from None
            delay = BACKOFF_SECONDS * 2 ** number * random.uniform(0.5, 1.5)  # jitter: ranks don't retry in step
            if e.retry_after is not None:
                delay = max(delay, e.retry_after)
            delay = min(delay, MAX_BACKOFF_SECONDS)
            print(f"{action} {url} failed ({e}); retry {number + 1} of {retries} in {delay:.1f}s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)


def _download(url, target):
    if _scheme(url) == "gs":
        _download_gcs(url, target)
    else:
        _download_http(url, target)


# -- progress

# Where MPI launchers put a process's rank (Open MPI, PMIx, MPICH/Intel MPI/Slurm). Asking MPI itself would be a
# collective call, which a download on one rank must not make.
_RANK_ENV_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def _launcher_rank() -> int:
    """This process's rank in its MPI job, as its launcher set it; 0 when no launcher started it."""
    for name in _RANK_ENV_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _size_text(size: float) -> str:
    """A byte count in decimal units: 512 B, 4.2 kB, 497.8 MB, 6.2 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _time_text(seconds: float) -> str:
    """0.4s, 25.3s, 3m07s, 2h05m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Progress:
    """What one download attempt shows on stderr, on MPI rank 0 only: while stderr is a terminal, a bar updated in
    place (file name, percentage, bytes done/total, rate, time left); when the file is complete, one line naming
    the URL, the cache path, the size, the time and the rate (on a terminal it replaces the bar). A failed attempt
    clears its bar and says nothing: its error does. `total`: the size in bytes, None when unknown."""

    def __init__(self, url: str, target: str, total: Optional[int]):
        self.url, self.target, self.total = url, target, total
        self.shown = _launcher_rank() == 0
        self.done = 0
        self.bar = None

    def __enter__(self):
        self.start = time.monotonic()
        if self.shown and _is_terminal(sys.stderr):
            from tqdm import tqdm
            known = "{percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B, {rate_fmt}, {remaining} left"
            self.bar = tqdm(total=self.total, desc=os.path.basename(self.target), unit="B", unit_scale=True,
                            unit_divisor=1000, leave=False, dynamic_ncols=True, file=sys.stderr,
                            bar_format="{desc}: " + (known if self.total is not None else "{n_fmt}B, {rate_fmt}"))
        return self

    def update(self, count: int):
        self.done += count
        if self.bar is not None:
            self.bar.update(count)

    def __exit__(self, exc_type, exc, tb):
        if self.bar is not None:
            self.bar.close()  # leave=False: the bar's line is cleared
        if exc_type is None and self.shown:
            elapsed = time.monotonic() - self.start
            rate = _size_text(self.done / max(elapsed, 1e-3))
            print(f"downloaded {self.url} -> {self.target} ({_size_text(self.done)} in {_time_text(elapsed)}, "
                  f"{rate}/s)", file=sys.stderr, flush=True)
        return False


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


class _CountingWriter:
    """A binary file whose writes are also counted by `count(number of bytes)`."""

    def __init__(self, file, count):
        self._file, self._count = file, count

    def write(self, data):
        written = self._file.write(data)
        self._count(len(data))
        return written

    def __getattr__(self, name):  # seek, tell, flush, ...: the file's own
        return getattr(self._file, name)


# -- http(s)

_TRANSIENT_STATUS = {408, 425, 429}


def _http_get(url, method="GET"):
    """The response, or _Permanent (unreachable host, 4xx) / _Transient (5xx, 429, reset, timeout)."""
    import requests
    try:
        response = requests.request(method, url, stream=True, allow_redirects=True,
                                    timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
                                    # Identity encoding: the bytes on the wire are the file, and
                                    # Content-Length counts them.
                                    headers={"Accept-Encoding": "identity"})
    except requests.exceptions.ConnectTimeout:
        raise _Permanent(f"host unreachable: no connection within {CONNECT_TIMEOUT_SECONDS:g}s (offline?)") from None
    except requests.exceptions.ConnectionError as e:
        if _never_connected(e):
            raise _Permanent(f"host unreachable (offline?): {_root_cause(e)}") from None
        raise _Transient(f"connection error: {_root_cause(e)}") from None
    except requests.exceptions.Timeout as e:
        raise _Transient(f"timeout: {_root_cause(e)}") from None
    except requests.exceptions.RequestException as e:
        raise _Permanent(f"{type(e).__name__}: {e}") from None
    if response.status_code >= 500 or response.status_code in _TRANSIENT_STATUS:
        response.close()
        raise _Transient(f"HTTP {response.status_code} {response.reason}", _retry_after(response))
    if response.status_code >= 400:
        response.close()
        raise _Permanent(f"HTTP {response.status_code} {response.reason} (not retried)", response.status_code)
    return response


def _never_connected(error) -> bool:
    """Did the request fail before any connection was made (DNS failure, refused, no route)?"""
    import urllib3
    reason = error.args[0] if error.args else None
    reason = getattr(reason, "reason", reason)  # MaxRetryError wraps the cause
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _root_cause(error) -> str:
    reason = error.args[0] if error.args else error
    reason = getattr(reason, "reason", reason)
    return str(reason)


def _retry_after(response) -> Optional[float]:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _download_http(url, target):
    import urllib3
    with _http_get(url) as response:
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        length = response.headers.get("Content-Length", "") if encoding == "identity" else ""
        expected = int(length) if length.isdigit() else None  # unknown: no size check, no percentage
        received = 0
        chunks = response.raw.stream(_STREAM_CHUNK_BYTES, decode_content=False)
        # The summary line comes after the rename: only a file in the cache is reported as downloaded.
        with _Progress(url, target, expected) as progress, _atomic_file(target) as f:
            while True:
                try:
                    chunk = next(chunks, None)
                except (urllib3.exceptions.HTTPError, OSError) as e:  # reset, read timeout, early close
                    reason = e.args[0] if e.args and isinstance(e.args[0], str) else e
                    raise _Transient(f"transfer interrupted after {received} bytes: {reason}") from None
                if chunk is None:
                    break
                f.write(chunk)  # a local write error (disk full) is not retried
                received += len(chunk)
                progress.update(len(chunk))
            if expected is not None and received != expected:
                raise _Transient(f"truncated body: got {received} of {expected} bytes")


def _remote_exists_http(url) -> bool:
    try:
        response = _http_get(url, method="HEAD")
    except _Permanent as e:
        if e.status == 404:
            return False
        raise
    response.close()
    return True


# -- gs://

def _gcs_client(authenticated=False):
    """A google-cloud-storage Client. Reading (authenticated=False) is anonymous unless
    $GOOGLE_APPLICATION_CREDENTIALS names credentials: public buckets need no account, and looking up default
    credentials would probe the GCE metadata server. Save directories (authenticated=True) use the default
    credentials (that variable, `gcloud auth application-default login`, or the machine's service account).
    Under $STORAGE_EMULATOR_HOST the library talks to that emulator without credentials."""
    try:
        from google.cloud import storage
    except ImportError:
        raise _Permanent("gs:// paths need google-cloud-storage (pip install google-cloud-storage)") from None
    from google.auth import exceptions as auth_exceptions
    if not authenticated and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return storage.Client.create_anonymous_client()
    try:
        return storage.Client(project=None)  # no project: bucket and object calls need none
    except auth_exceptions.DefaultCredentialsError as e:
        raise _Permanent(f"no Google Cloud credentials ({e}); run `gcloud auth application-default login` or set "
                         f"GOOGLE_APPLICATION_CREDENTIALS to a service account key file") from None


def _gcs_blob(url):
    """The google-cloud-storage Blob for gs://BUCKET/NAME, read anonymously unless credentials are configured."""
    parsed = urllib.parse.urlsplit(url)
    return _gcs_client().bucket(parsed.netloc).blob(parsed.path.lstrip("/"))


def _gcs_call(call):
    """Run a google-cloud-storage call, mapping its errors to _Transient / _Permanent."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    import requests
    try:
        return call()
    except (api_exceptions.TooManyRequests, api_exceptions.ServerError, api_exceptions.RequestRangeNotSatisfiable,
            requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from None
    except api_exceptions.GoogleAPICallError as e:
        raise _Permanent(f"{type(e).__name__}: {e} (not retried)", getattr(e, "code", None)) from None
    except requests.exceptions.ConnectionError as e:
        if _never_connected(e):
            raise _Permanent(f"host unreachable (offline?): {_root_cause(e)}") from None
        raise _Transient(f"connection error: {_root_cause(e)}") from None
    except auth_exceptions.TransportError as e:
        raise _Permanent(f"host unreachable (offline?): {e}") from None


def _download_gcs(url, target, blob=None):
    blob = blob or _gcs_blob(url)
    timeout = (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
    if blob.size is None:  # a blob made from its name; a listed one knows its size
        # retry=None: the library's own retries would wait minutes when offline; ours are bounded.
        _gcs_call(lambda: blob.reload(timeout=timeout, retry=None))
    with _Progress(url, target, blob.size) as progress, _atomic_file(target) as f:
        # The library verifies the download's checksum.
        _gcs_call(lambda: blob.download_to_file(_CountingWriter(f, progress.update), timeout=timeout, retry=None))


def _remote_exists_gcs(url) -> bool:
    blob = _gcs_blob(url)
    return _gcs_call(lambda: blob.exists(timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS), retry=None))


def _remote_exists(url) -> bool:
    return _remote_exists_gcs(url) if _scheme(url) == "gs" else _remote_exists_http(url)


# ----- gs:// save directories ------------------------------------------------------------------------------
#
# GCS writes each object atomically, so the order of the uploads is what keeps a run in a bucket consistent. A
# reader follows the state file `checkpoint` to model.ckpt-STEP.index and .data-*: those go up first and the
# state file last, and the checkpoints the Saver dropped are deleted remotely only after the new state file is
# up, when no state file in the bucket names them any more.

CHECKPOINT_STATE_NAME = "checkpoint"  # TensorFlow's checkpoint state file: names the latest checkpoint
SYNC_RECORD_NAME = ".gcs-sync.json"  # in the staging directory: what the bucket holds of it; never uploaded
_HASHED_BYTES = 1 << 20  # files up to this size are compared by MD5, larger ones by size and mtime


class Synced(NamedTuple):
    """What one sync_up did: file names relative to the run directory, in the order they went up / were deleted."""
    uploaded: List[str]
    deleted: List[str]


def staging_dir(save_dir, *, collective: bool = True) -> str:
    """The local directory that training writes the run to.

    A local `save_dir` is returned as it is. For gs://BUCKET/PATH it is cache_dir()/staging/BUCKET/PATH, made an
    exact copy of the objects under PATH/: those not there yet are downloaded (a file whose MD5 matches is kept),
    local files that the bucket does not hold are removed, so the directory is empty when nothing is saved there.
    Call it before writing anything to the run, and :func:`sync_up` after each save.

    Under MPI with several ranks this is COLLECTIVE for gs:// when `collective` is true: every rank calls it, and
    rank 0 of each machine downloads, so every machine holds the run (other ranks may load a model saved in it).
    """
    save_dir = os.fspath(save_dir)
    if not is_remote(save_dir):
        return os.path.expanduser(save_dir)
    bucket, prefix = _run_location(save_dir)
    local = os.path.join(cache_dir(), "staging", bucket, *filter(None, prefix.split("/")))
    _once_per_machine(lambda: _mirror_down(save_dir, local), save_dir, local, collective)
    return local


def sync_up(local_dir, save_dir) -> Synced:
    """Upload the run written to `local_dir` (see :func:`staging_dir`) to `save_dir`; nothing to do for a local
    `save_dir`.

    Only files that changed since the last sync_up (or since staging_dir downloaded them) are uploaded: every
    other file first, then the checkpoint state files `checkpoint`; then the objects of files that are gone
    locally (checkpoints the Saver dropped under max_to_keep) are deleted. When an upload fails, FileFetchError is
    raised before any state file is uploaded or anything deleted, so the bucket keeps the previous consistent
    run; the next sync_up uploads what is still missing.

    Not collective: under MPI only the rank that writes the run (rank 0) calls it.
    """
    save_dir = os.fspath(save_dir)
    if not is_remote(save_dir):
        return Synced([], [])
    bucket_name, prefix = _run_location(save_dir)
    local_dir = os.path.expanduser(os.fspath(local_dir))
    if not os.path.isdir(local_dir):
        raise ValueError(f"cannot upload {local_dir} to {save_dir}: {local_dir} is not a directory")
    record = _read_sync_record(local_dir, save_dir)
    present = _local_files(local_dir)
    changed = [name for name in present if not _unchanged(record.get(name), _local_file(local_dir, name))]
    changed.sort(key=lambda name: (_is_checkpoint_state(name), name))  # state files last
    gone = sorted(set(record) - set(present))
    done = Synced([], [])
    if not changed and not gone:
        return done
    client = _run_call(save_dir, local_dir, lambda: _gcs_client(authenticated=True), "upload to")
    bucket = client.bucket(bucket_name)
    try:
        for name in changed:
            path = _local_file(local_dir, name)
            fingerprint = _fingerprint(path)  # taken first: a file that grows during its upload counts as changed
            object_name = _object_name(prefix, name)
            _run_call(join(save_dir, name), path, lambda: _upload_gcs(bucket, path, object_name), "upload to")
            record[name] = fingerprint
            done.uploaded.append(name)
        for name in gone:
            object_name = _object_name(prefix, name)
            _run_call(join(save_dir, name), None, lambda: _delete_gcs(bucket, object_name), "delete")
            del record[name]
            done.deleted.append(name)
    finally:
        _write_sync_record(local_dir, save_dir, record)
    return done


def remote_dir_exists(url) -> bool:
    """True when any object lies under gs://BUCKET/PATH/ (e.g. a run is saved there). FileFetchError when the
    bucket does not exist or cannot be read with these credentials."""
    url = os.fspath(url)
    bucket, prefix = _run_location(url)

    def attempt():
        blobs = _gcs_client(authenticated=True).list_blobs(
            bucket, prefix=_dir_prefix(prefix), max_results=1, retry=None,
            timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))
        return any(True for _ in blobs)

    return _run_call(url, None, attempt, "list")


def _run_location(url) -> Tuple[str, str]:
    """(bucket, object prefix without slashes at the ends) of gs://BUCKET[/PATH]; ValueError for anything else."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() != "gs":
        raise ValueError(f"{url!r}: runs are saved to a local directory or a gs://BUCKET/PATH URL "
                         f"({parsed.scheme}:// cannot be written)")
    parts = [p for p in parsed.path.split("/") if p]
    if not parsed.netloc or parsed.query or parsed.fragment or any(p in (".", "..") for p in parts):
        raise ValueError(f"{url!r} is not a valid save directory (expected gs://BUCKET/PATH, without '.', '..', "
                         f"'?' or '#')")
    return parsed.netloc, "/".join(parts)


def _dir_prefix(prefix) -> str:
    return prefix + "/" if prefix else ""


def _object_name(prefix, name) -> str:
    return _dir_prefix(prefix) + name


def _local_file(directory, name) -> str:
    return os.path.join(directory, *name.split("/"))


def _is_checkpoint_state(name) -> bool:
    return name.rsplit("/", 1)[-1] == CHECKPOINT_STATE_NAME


def _local_files(directory) -> List[str]:
    """Files under `directory` as '/'-separated relative names, without the sync record and the temporary files
    of atomic writes still in progress."""
    names = []
    for parent, subdirs, filenames in os.walk(directory):
        subdirs.sort()
        relative = os.path.relpath(parent, directory).replace(os.sep, "/")
        for filename in sorted(filenames):
            name = filename if relative == "." else f"{relative}/{filename}"
            if name != SYNC_RECORD_NAME and not filename.endswith(".part"):
                names.append(name)
    return names


def _md5(path) -> str:
    """Base64 MD5 of a file, as GCS reports it (md5Hash)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def _fingerprint(path) -> Dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "md5": _md5(path) if stat.st_size <= _HASHED_BYTES else None}


def _unchanged(recorded: Optional[Dict], path) -> bool:
    """Is the file as it was when recorded? Small files are compared by content: a file rewritten within the file
    system's timestamp granularity (a state file saved twice in a few milliseconds) keeps its mtime, and a
    rewrite with the same content (hparams.json at every save) is no change."""
    if recorded is None:
        return False
    stat = os.stat(path)
    if stat.st_size != recorded["size"]:
        return False
    if stat.st_size <= _HASHED_BYTES:
        return _md5(path) == recorded["md5"]
    return stat.st_mtime_ns == recorded["mtime_ns"]


def _read_sync_record(local_dir, save_dir) -> Dict[str, Dict]:
    """{relative name: fingerprint} of the files known to be in `save_dir`; empty when unknown (all go up)."""
    try:
        with open(os.path.join(local_dir, SYNC_RECORD_NAME), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record.get("files", {}) if isinstance(record, dict) and record.get("save_dir") == save_dir else {}


def _write_sync_record(local_dir, save_dir, files_record):
    write_text_atomic(os.path.join(local_dir, SYNC_RECORD_NAME),
                      json.dumps({"save_dir": save_dir, "files": files_record}, sort_keys=True) + "\n")


def _run_call(url, local, call, action):
    """`call()` (google-cloud-storage work for a save directory) with retries; FileFetchError naming the URL."""
    try:
        return _attempts(url, local, lambda: _gcs_call(call), action)
    except _Permanent as e:
        hint = f" (does the bucket gs://{_run_location(url)[0]} exist?)" if e.status == 404 else ""
        where = f"; local path {local}" if local else ""
        raise FileFetchError(f"could not {action} {url}: {e}{hint}{where}", url=url, cache_path=local,
                             status=e.status) from None


def _mirror_down(url, local):
    """Make directory `local` hold exactly the objects under `url`/ (see staging_dir)."""
    bucket, prefix = _run_location(url)
    client = _run_call(url, local, lambda: _gcs_client(authenticated=True), "list")
    blobs = _run_call(url, local, lambda: list(client.list_blobs(
        bucket, prefix=_dir_prefix(prefix), retry=None, timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))),
        "list")
    remote = {}
    for blob in blobs:
        name = blob.name[len(_dir_prefix(prefix)):]
        if name.endswith("/"):  # a "folder" placeholder made by the web console, not a file
            continue
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"{url}: object {blob.name!r} cannot be stored as a local file (empty, '.' or '..' "
                             f"path component); rename or remove it")
        remote[name] = blob
    os.makedirs(local, exist_ok=True)
    for name in _local_files(local):
        if name not in remote:
            os.remove(_local_file(local, name))
    for parent, _, _ in sorted(os.walk(local), reverse=True):  # deepest first, so that emptied parents go too
        if parent != local and not os.listdir(parent):
            os.rmdir(parent)
    record = {}
    for name, blob in sorted(remote.items()):
        path = _local_file(local, name)
        if not (os.path.isfile(path) and _md5(path) == blob.md5_hash):
            _run_call(join(url, name), path, lambda: _download_gcs(join(url, name), path, blob), "fetch")
        record[name] = _fingerprint(path)
    _write_sync_record(local, url, record)


def _upload_gcs(bucket, path, object_name):
    """One file to one object; GCS makes it visible only once it is complete."""
    # retry=None: our retries are bounded (the library's own would wait minutes when offline).
    bucket.blob(object_name).upload_from_filename(path, retry=None,
                                                  timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))


def _delete_gcs(bucket, object_name):
    from google.api_core import exceptions as api_exceptions
    try:
        bucket.blob(object_name).delete(retry=None, timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))
    except api_exceptions.NotFound:
        pass  # already gone
