"""A real S3-compatible server on loopback for tests: moto's server mode in a subprocess.

A subprocess (``python -m moto.server``) rather than an in-process thread, so that fault tests can stop it in
the middle of an epoch and child processes (``composer -n 2``, data loader workers) reach the same server.
It binds 127.0.0.1 only, on a free port, and tests talk to it with fake credentials through the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``S3_ENDPOINT_URL``) exactly as a user of an S3-compatible
store would.

With ``auth=True`` the server checks credentials (moto's IAM emulation): :meth:`MotoServer.start` creates a
user and an access key with its first requests, and only that key is accepted afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

__all__ = ["MotoServer", "moto_server", "s3", "unique_bucket", "write_synthetic_tree"]

_FAKE_KEY, _FAKE_SECRET = "testing-key", "testing-secret"
_IAM_SETUP_ACTIONS = 3  # create_user, create_access_key, put_user_policy


#: the image kinds :func:`write_synthetic_tree` cycles through: (PIL mode, format, file suffix)
SYNTHETIC_KINDS = (
    ("RGB", "JPEG", ".jpg"),
    ("L", "JPEG", ".jpeg"),
    ("CMYK", "JPEG", ".jpg"),
    ("P", "PNG", ".png"),
    ("RGBA", "PNG", ".png"),
    ("RGB", "JPEG", ".JPG"),
    ("RGB", "PNG", ".png"),
    ("RGB", "JPEG", ".jpg"),
)


def write_synthetic_tree(root: Path, classes: tuple[str, ...] = ("cat", "ant", "bee"), per_class: int = 16) -> list:
    """Writes an ImageFolder tree of small random images of several kinds; returns its listing.

    Each class gets ``per_class`` images cycling through :data:`SYNTHETIC_KINDS` (RGB, greyscale and CMYK JPEGs,
    palette / RGBA / RGB PNGs, an upper-case ``.JPG``), of varied sizes, the last quarter of them in a sub-folder
    ``zz_more/``, plus a ``notes.txt`` that is not an image.

    Returns:
        ``[(path relative to root, class index, kind index), ...]`` in the order the converter must use:
        classes sorted by name, then paths sorted.
    """
    import numpy as np
    from PIL import Image

    listing = []
    for label, name in enumerate(sorted(classes)):
        folder = root / name
        (folder / "zz_more").mkdir(parents=True, exist_ok=True)
        (folder / "notes.txt").write_text("not an image")
        for j in range(per_class):
            kind = (j + label) % len(SYNTHETIC_KINDS)
            mode, fmt, suffix = SYNTHETIC_KINDS[kind]
            rng = np.random.default_rng(1000 * label + j)
            size = (24 + 3 * j, 20 + 2 * (j % 5))
            yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
            freq, phase = rng.uniform(0.03, 0.12, size=3), rng.uniform(0, 6.3, size=3)
            waves = [127 + 120 * np.sin(freq[c] * (xx + c * yy) + phase[c]) for c in range(3)]
            image = Image.fromarray(np.stack(waves, axis=-1).round().astype(np.uint8))  # smooth colour waves
            if mode == "P":
                image = image.quantize(16)
            elif mode != "RGB":
                image = image.convert(mode)
            sub = "zz_more/" if j >= per_class * 3 // 4 else ""
            rel = f"{name}/{sub}img_{j:03d}{suffix}"
            image.save(root / rel, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
            listing.append((rel, label, kind))
    return sorted(listing, key=lambda item: (item[1], item[0]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique_bucket(prefix: str = "test") -> str:
    """A fresh valid bucket name."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class MotoServer:
    """A moto S3 server in a subprocess on 127.0.0.1.

    Args:
        auth (bool): check credentials (IAM emulation) instead of accepting any.
        log (Path, optional): file for the server's output (default: discarded).
    """

    def __init__(self, auth: bool = False, log: Path | None = None) -> None:
        self.auth = auth
        self.log = log
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.access_key, self.secret_key = _FAKE_KEY, _FAKE_SECRET

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 and streaming at this server, with its credentials."""
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def start(self, port: int | None = None, timeout: float = 60.0) -> MotoServer:
        """Starts the server (on ``port``, or a free one) and waits until it answers."""
        for _ in range(3):
            self.port = port or _free_port()
            env = dict(os.environ)
            if self.auth:
                env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_IAM_SETUP_ACTIONS)
            out = open(self.log, "ab") if self.log else subprocess.DEVNULL
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            if self._wait_ready(timeout):
                break
            self.stop()
            if port:
                raise RuntimeError(f"moto server did not start on port {port}")
        else:
            raise RuntimeError("moto server did not start on any of 3 free ports")
        if self.auth:
            self._create_user()
        return self

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).read()
                return True
            except OSError:
                time.sleep(0.1)
        return False

    def _create_user(self) -> None:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=_FAKE_KEY,
            aws_secret_access_key=_FAKE_SECRET,
        )
        iam.create_user(UserName="tester")
        key = iam.create_access_key(UserName="tester")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=json.dumps(policy))
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        """Stops the server (terminate, then kill after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def client(self) -> Any:
        """A boto3 S3 client for this server with its credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """Creates a fresh bucket and returns its name."""
        name = unique_bucket(prefix)
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    """One moto server per test module (accepting any credentials)."""
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """The module's moto server, with its endpoint and credentials in the environment for this test."""
    for key, value in moto_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    yield moto_server
