"""Faults of a real S3-compatible server (moto on loopback): each ends with a clear error, within a bound, and
leaves no corrupt file behind in the local cache."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from streaming.base.hashing import get_hash

from magma_composer.data.checked_streaming import CheckedStreamingDataset, StreamingDataError
from magma_composer.data.convert import convert_image_folder, main
from magma_composer.data.dataset import StreamingImageDataset
from magma_composer.data.storage import RemoteDataError, check_remote
from tests.conftest import free_port
from tests.s3_server import MotoServer, moto_server, s3, write_synthetic_tree  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def own_server(tmp_path, monkeypatch):
    """A moto server of this test alone (it may stop it), its environment set."""
    server = MotoServer(log=tmp_path / "moto.log").start()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def _upload(server, src: Path, per_class: int = 32, shard_size: str = "4kb") -> str:
    write_synthetic_tree(src, per_class=per_class)
    bucket = server.make_bucket()
    convert_image_folder(src, f"s3://{bucket}/ds/train", shard_size=shard_size, progress=False)
    return bucket


def _assert_cache_is_sound(cache: Path) -> int:
    """Every shard file in the cache matches the hash its index records; no partial downloads. Returns the count."""
    index = json.loads((cache / "train" / "index.json").read_text())
    expected = {s["raw_data"]["basename"]: s["raw_data"]["hashes"]["xxh64"] for s in index["shards"]}
    files = [p for p in (cache / "train").rglob("*") if p.is_file() and p.name != "index.json"]
    assert not [p for p in files if p.suffix not in (".mds",)], files  # no .tmp or other leftovers
    for path in files:
        name = path.relative_to(cache / "train").as_posix()
        assert get_hash("xxh64", path.read_bytes()) == expected[name], f"corrupt file left in the cache: {name}"
    return len(files)


def _iterate(dataset, num_workers: int = 0, stop_after_batches: int | None = None, on_stop=None) -> int:
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=list)
    count = 0
    for batch_index, batch in enumerate(loader):
        count += len(batch)
        if stop_after_batches is not None and batch_index + 1 == stop_after_batches:
            on_stop()
    return count


def test_server_down_at_start(tmp_path, monkeypatch, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    with pytest.raises(RemoteDataError) as error:
        check_remote("s3://bucket/ds", split="train")
    assert endpoint in str(error.value) and "cannot connect to the S3 endpoint" in str(error.value)
    assert "s3://bucket/ds/train/index.json" in str(error.value)

    with pytest.raises(RemoteDataError, match="cannot connect to the S3 endpoint"):
        CheckedStreamingDataset(remote="s3://bucket/ds", local=str(tmp_path / "cache"), split="train", batch_size=4)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.mds"))

    write_synthetic_tree(tmp_path / "src", per_class=2)
    assert main(["--src", str(tmp_path / "src"), "--out", "s3://bucket/ds", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert endpoint in err and "cannot connect to the S3 endpoint" in err


@pytest.mark.parametrize("num_workers", [0, 1])
def test_server_stops_mid_epoch(own_server, tmp_path, num_workers):
    bucket = _upload(own_server, tmp_path / "src")
    cache = tmp_path / "cache"
    dataset = CheckedStreamingDataset(
        remote=f"s3://{bucket}/ds", local=str(cache), split="train", batch_size=4, predownload=4, download_timeout=5
    )
    with pytest.raises(StreamingDataError) as error:
        _iterate(dataset, num_workers, stop_after_batches=2, on_stop=own_server.stop)
    message = str(error.value)
    assert "cannot download shard" in message and "cannot connect to the S3 endpoint" in message
    assert own_server.endpoint in message and f"s3://{bucket}/ds/train/chunk-00000/shard." in message
    assert 0 < _assert_cache_is_sound(cache) < len(dataset.shards)  # some shards came, none half-way


def test_server_freezes_mid_epoch(own_server, tmp_path):
    bucket = _upload(own_server, tmp_path / "src")
    dataset = CheckedStreamingDataset(
        remote=f"s3://{bucket}/ds",
        local=str(tmp_path / "cache"),
        split="train",
        batch_size=4,
        predownload=4,
        download_timeout=2,  # seconds per request
    )
    with pytest.raises(StreamingDataError, match="cannot download shard") as error:
        _iterate(dataset, stop_after_batches=2, on_stop=lambda: os.kill(own_server.process.pid, signal.SIGSTOP))
    assert "timeout" in str(error.value).lower()
    _assert_cache_is_sound(tmp_path / "cache")


def test_wrong_credentials(tmp_path, monkeypatch, capsys):
    server = MotoServer(auth=True, log=tmp_path / "moto.log").start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        bucket = _upload(server, tmp_path / "src", per_class=4, shard_size="64mb")
        remote = f"s3://{bucket}/ds"
        assert check_remote(remote, split="train")["samples"] == 12  # the right key works

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(RemoteDataError) as error:
            CheckedStreamingDataset(remote=remote, local=str(tmp_path / "cache"), split="train", batch_size=4)
        message = str(error.value)
        assert "rejected the credentials (SignatureDoesNotMatch" in message and server.endpoint in message
        assert "AWS_SECRET_ACCESS_KEY" in message

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        with pytest.raises(RemoteDataError, match="rejected the credentials \\(InvalidAccessKeyId"):
            check_remote(remote, split="train")
        assert main(["--src", str(tmp_path / "src"), "--out", f"{remote}/again", "--no-progress"]) == 1
        assert "rejected the credentials" in capsys.readouterr().err
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.mds"))
    finally:
        server.stop()


def test_missing_bucket_prefix_or_split(s3, tmp_path, capsys):  # noqa: F811
    bucket = _upload(s3, tmp_path / "src", per_class=4, shard_size="64mb")

    with pytest.raises(RemoteDataError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1:"):
        CheckedStreamingDataset(remote="s3://no-such-bucket/ds", local=str(tmp_path / "c1"), batch_size=4)
    with pytest.raises(RemoteDataError) as error:
        check_remote(f"s3://{bucket}/dataset", split="train")  # wrong prefix
    assert f"s3://{bucket}/dataset/train/index.json" in str(error.value)
    assert f"s3://{bucket}/ holds ['ds/']" in str(error.value)
    with pytest.raises(RemoteDataError) as error:
        CheckedStreamingDataset(remote=f"s3://{bucket}/ds", local=str(tmp_path / "c2"), split="val", batch_size=4)
    assert f"s3://{bucket}/ds holds ['train/']" in str(error.value)

    argv = ["--src", str(tmp_path / "src"), "--out", "s3://no-such-bucket/ds", "--no-progress"]
    assert main(argv) == 1
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("num_workers", [0, 1])
def test_flipped_bytes_in_a_shard(s3, tmp_path, num_workers):  # noqa: F811
    bucket = _upload(s3, tmp_path / "src", per_class=8, shard_size="8kb")
    key = "ds/train/chunk-00000/shard.00002.mds"
    good = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(flipped))

    cache = tmp_path / "cache"
    dataset = CheckedStreamingDataset(remote=f"s3://{bucket}/ds", local=str(cache), split="train", batch_size=4)
    assert dataset.streams[0].validate_hash == "xxh64"  # chosen from the hashes the converter wrote
    with pytest.raises(StreamingDataError) as error:
        _iterate(dataset, num_workers)
    assert "shard chunk-00000/shard.00002.mds" in str(error.value) and "failed its hash check" in str(error.value)
    assert not (cache / "train" / "chunk-00000" / "shard.00002.mds").exists()  # the corrupt copy is gone
    _assert_cache_is_sound(cache)

    # the store repaired, the same cache serves a whole epoch
    s3.client().put_object(Bucket=bucket, Key=key, Body=good)
    dataset = CheckedStreamingDataset(remote=f"s3://{bucket}/ds", local=str(cache), split="train", batch_size=4)
    assert _iterate(dataset, num_workers) == 24
    assert _assert_cache_is_sound(cache) == len(dataset.shards)


def test_streaming_image_dataset_fails_loudly(s3, tmp_path):  # noqa: F811
    """The training data set gets the same checks once it is built on CheckedStreamingDataset."""
    bucket = _upload(s3, tmp_path / "src", per_class=8, shard_size="8kb")
    key = "ds/train/chunk-00000/shard.00001.mds"
    flipped = bytearray(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    flipped[10] ^= 0x01
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(flipped))
    images = StreamingImageDataset(remote=f"s3://{bucket}/ds", local=str(tmp_path / "c"), split="train", batch_size=4)
    with pytest.raises(StreamingDataError, match="shard chunk-00000/shard.00001.mds .* failed its hash check"):
        _iterate(images, num_workers=1)
    with pytest.raises(RemoteDataError, match="does not exist"):
        StreamingImageDataset(remote="s3://no-such-bucket/ds", local=str(tmp_path / "d"), batch_size=4)


def test_server_stops_during_conversion(own_server, tmp_path, monkeypatch, capsys):
    import magma_composer.data.convert as convert

    write_synthetic_tree(tmp_path / "src", per_class=8)
    bucket = own_server.make_bucket()
    real_write = convert._write_chunk

    def write_then_stop(folder, *args, **kwargs):
        marker = real_write(folder, *args, **kwargs)
        if folder.name == "chunk-00001":
            own_server.stop()
        return marker

    monkeypatch.setattr(convert, "_write_chunk", write_then_stop)
    argv = ["--src", str(tmp_path / "src"), "--out", f"s3://{bucket}/ds", "--chunk-files", "6"]
    argv += ["--staging", str(tmp_path / "staging"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot connect to the S3 endpoint" in err and own_server.endpoint in err
    # the finished chunks that could not be uploaded stay staged, with their markers, for the rerun
    staged = sorted(p.parent.name for p in (tmp_path / "staging").glob("chunk-*/done.json"))
    assert "chunk-00001" in staged


# ------------------------------------------------------------------------------------- endpoints that never answer


class SilentEndpoint:
    """A loopback TCP server that accepts every connection and never sends a byte (a hung S3 endpoint).

    With ``upstream`` (a port), a proxy instead: requests go through to that server unless their request line
    (``'PUT /bucket/key HTTP/1.1'``) matches ``freeze``, after which that connection stays silent.
    """

    def __init__(self, upstream: int | None = None, freeze: Callable[[str], bool] = lambda line: True) -> None:
        self.upstream, self.freeze = upstream, freeze
        self.frozen: list[str] = []
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            self._sockets.append(client)
            if self.upstream is not None:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
                self._sockets.append(upstream)
                threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
                threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        frozen = False
        while not frozen:
            try:
                data = client.recv(1 << 16)
            except OSError:
                return
            if not data:
                break
            line = data.split(b"\r\n", 1)[0].decode("latin-1")
            if re.match(r"^[A-Z]+ /\S* HTTP/1\.[01]$", line) and self.freeze(line):
                self.frozen.append(line)
                frozen = True  # keep the connection open and answer nothing, ever
            else:
                upstream.sendall(data)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._server.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def silent(monkeypatch):
    """A silent endpoint, set as ``S3_ENDPOINT_URL`` with dummy credentials."""
    endpoint = SilentEndpoint()
    for key, value in {
        "S3_ENDPOINT_URL": endpoint.endpoint,
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    yield endpoint
    endpoint.close()


TIMEOUT = 1.0  # seconds per S3 request in these tests
BOUND = 10 * TIMEOUT  # three attempts, backoffs and Python's own work fit well inside; a default client takes 300 s


def test_silent_endpoint_converter_fails_within_bound(silent, tmp_path, capsys):
    write_synthetic_tree(tmp_path / "src", per_class=2)
    argv = ["--src", str(tmp_path / "src"), "--out", "s3://bucket/ds", "--timeout", f"{TIMEOUT:g}", "--no-progress"]
    start = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - start < BOUND
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert f"cannot list s3://bucket/ds (bucket 'bucket', key 'ds') at {silent.endpoint}" in err
    assert "did not answer within 1 s (connect) / 1 s (answer) per attempt, 3 attempts" in err
    assert "--timeout is 1 s: raise it if the store is only slow" in err


def test_silent_endpoint_check_remote_within_bound(silent):
    start = time.monotonic()
    with pytest.raises(RemoteDataError) as error:
        check_remote("s3://bucket/ds", split="train", timeout=TIMEOUT)
    assert time.monotonic() - start < BOUND
    message = str(error.value)
    assert "s3://bucket/ds/train/index.json" in message and silent.endpoint in message
    assert "did not answer within 1 s (connect) / 1 s (answer) per attempt, 3 attempts" in message


def test_silent_endpoint_during_training_download_within_bound(s3, tmp_path, monkeypatch):  # noqa: F811
    """The data set is checked against a working store; then the store hangs: the first shard download fails
    within the bound set by ``download_timeout`` (and ``download_retry``), naming the shard and the endpoint."""
    bucket = _upload(s3, tmp_path / "src", per_class=4, shard_size="4kb")
    dataset = CheckedStreamingDataset(
        remote=f"s3://{bucket}/ds",
        local=str(tmp_path / "cache"),
        split="train",
        batch_size=4,
        download_timeout=TIMEOUT,
        download_retry=1,  # streaming's count of attempts, despite its name
    )
    endpoint = SilentEndpoint()
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint.endpoint)
    try:
        start = time.monotonic()
        with pytest.raises(StreamingDataError, match="cannot download shard") as error:
            _iterate(dataset)
        assert time.monotonic() - start < min(BOUND, dataset.shard_deadline)
    finally:
        endpoint.close()
    assert endpoint.endpoint in str(error.value) and "did not answer" in str(error.value)
    _assert_cache_is_sound(tmp_path / "cache")


def _first_run(s3, tmp_path) -> tuple[str, list[str]]:  # noqa: F811
    bucket = s3.make_bucket()
    write_synthetic_tree(tmp_path / "src", per_class=4)
    argv = ["--src", str(tmp_path / "src"), "--out", f"s3://{bucket}/ds", "--chunk-files", "4"]
    argv += ["--staging", str(tmp_path / "staging"), "--timeout", f"{TIMEOUT:g}", "--no-progress"]
    return bucket, argv


@pytest.mark.parametrize(
    "call, pattern, finish_first",
    [
        ("read_json", r"^GET /[^/]+/ds/chunk-00000/done\.json", True),  # the resume reads chunk markers
        ("write_bytes", r"^PUT /[^/]+/ds/conversion\.json", False),  # the record, written after the listing
        ("upload_file", r"^PUT /[^/]+/ds/chunk-00001/shard", False),  # a chunk's shards, in the upload thread
        ("remove", r"^POST /[^/]+\?delete", True),  # a changed chunk's old objects are deleted first
    ],
)
def test_every_converter_s3_call_is_bounded(s3, tmp_path, monkeypatch, capsys, call, pattern, finish_first):  # noqa: F811
    """One kind of request hangs (a proxy to the moto server answers the others): the conversion still ends
    within the bound, with exit 1 and an error naming the endpoint and the limit."""
    bucket, argv = _first_run(s3, tmp_path)
    if finish_first:
        assert main(argv) == 0
        capsys.readouterr()
        if call == "remove":  # a changed file makes its chunk be rewritten, replacing the uploaded one
            changed = tmp_path / "src" / "ant" / "img_000.jpg"
            changed.write_bytes(changed.read_bytes())
            os.utime(changed, ns=(0, changed.stat().st_mtime_ns + 10**9))
    proxy = SilentEndpoint(upstream=int(s3.endpoint.rsplit(":", 1)[1]), freeze=re.compile(pattern).match)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    try:
        start = time.monotonic()
        code = main(argv)
        elapsed = time.monotonic() - start
    finally:
        proxy.close()
    assert proxy.frozen, f"no request matched {pattern}"
    assert code == 1 and elapsed < 2 * BOUND  # up to two requests may hang in turn (a chunk's upload, then ours)
    err = capsys.readouterr().err
    assert "Traceback" not in err and proxy.endpoint in err
    assert "did not answer within 1 s (connect) / 1 s (answer) per attempt, 3 attempts" in err, err
