"""Shared test setup: quiet TensorFlow with its oneDNN CPU kernels (as the entry points have it), TF1 graph mode, a
fresh graph per test; a Cloud Storage emulator; a fake terminal for progress bars."""
import importlib.util
import io
import os
import re
import socket
import subprocess
import sys
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import requests  # noqa: E402

from lm_human_preferences.utils import devices  # noqa: E402

devices.use_onednn()  # the tests compute with the kernels the entry points use
import tensorflow as tf  # noqa: E402

tf.compat.v1.disable_eager_execution()


@pytest.fixture(autouse=True)
def fresh_graph():
    """Each test builds into its own default graph, so variable names never collide across tests."""
    graph = tf.Graph()
    with graph.as_default():
        yield graph


# ----- a local Cloud Storage emulator for gs:// tests -----------------------------------------------------

class GcsEmulator:
    """gcp-storage-emulator (the test extra) in a subprocess on a free 127.0.0.1 port, keeping objects in memory.
    `url` is what google-cloud-storage needs in $STORAGE_EMULATOR_HOST (pass it to subprocesses yourself)."""

    START_SECONDS = 30

    def __init__(self, log_path):
        if importlib.util.find_spec("gcp_storage_emulator") is None:
            pytest.fail("the gs:// tests need the Cloud Storage emulator: pip install -e '.[test]' "
                        "(package gcp-storage-emulator)", pytrace=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                 "--in-memory", "--quiet"], stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_serving()

    def _wait_until_serving(self):
        deadline = time.monotonic() + self.START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/storage/v1/b", timeout=1).ok:
                    return
            except requests.exceptions.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        with open(self.log_path, errors="replace") as f:
            log = f.read()
        pytest.fail(f"the Cloud Storage emulator did not start on {self.url} within {self.START_SECONDS}s; "
                    f"its output:\n{log}", pytrace=False)

    def create_bucket(self, name):
        response = requests.post(f"{self.url}/storage/v1/b", json={"name": name}, timeout=10)
        response.raise_for_status()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """One Cloud Storage emulator for the session; stopped at the end. Fails (never skips) when not installed."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs_emulator") / "emulator.log")
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):
    """A fresh, empty bucket on the emulator, as "gs://NAME"; $STORAGE_EMULATOR_HOST points this test's
    google-cloud-storage clients at the emulator (restored afterwards)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    name = f"test-{uuid.uuid4().hex[:16]}"
    gcs_emulator.create_bucket(name)
    return f"gs://{name}"


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal (so progress bars are drawn) and keeps what was written."""

    def isatty(self):
        return True

    def bars(self, desc):
        """Each state drawn of the progress bar named `desc`, in order, e.g. "ppo:  40%|...| 2/5 [...]"."""
        return [line.strip() for line in re.split(r"[\r\n]", self.getvalue()) if line.strip().startswith(desc)]


@pytest.fixture
def fake_terminal(monkeypatch):
    """Call it to make sys.stderr a FakeTerminal from then on (restored after the test); returns the terminal."""
    def install():
        terminal = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        return terminal
    return install
