"""Faults of a real S3-compatible server (moto on loopback): each ends with a clear error, within a bound, and
leaves no corrupt file behind in the local cache."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

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
