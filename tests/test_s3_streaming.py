"""Converting to and streaming from a real S3-compatible server (moto, on loopback), on one and two ranks."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from streaming import StreamingDataset

import magma_composer.data.convert as convert
from magma_composer.data.checked_streaming import CheckedStreamingDataset
from magma_composer.data.convert import BadImageError, convert_image_folder, encode_image, list_image_folder
from magma_composer.data.dataset import StreamingImageDataset
from magma_composer.data.storage import RemoteDataError, check_remote
from tests.conftest import REPO, free_port, tiny_recipe
from tests.s3_server import moto_server, s3, write_synthetic_tree  # noqa: F401  (fixtures)

COMPOSER = str(REPO / ".venv" / "bin" / "composer") if (REPO / ".venv" / "bin" / "composer").exists() else "composer"

#: run by ``composer -n 2 iterate.py OUT REMOTE...``: each rank iterates its share of one epoch of each remote (split
#: ``train``) through a DataLoader worker and writes ``[i, y, sha1 of x]`` per sample to ``OUT/rank<r>-<k>.json``
RANK_SCRIPT = """
import hashlib, json, os, sys
import torch
from magma_composer.data.checked_streaming import CheckedStreamingDataset

out = sys.argv[1]
for k, remote in enumerate(sys.argv[2:]):
    local = os.path.join(out, "cache-%d" % k)  # one cache per data set, shared by the ranks of the node
    dataset = CheckedStreamingDataset(remote=remote, local=local, split="train", batch_size=4, shuffle=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=list)
    seen = [[int(s["i"]), int(s["y"]), hashlib.sha1(s["x"]).hexdigest()] for batch in loader for s in batch]
    with open(os.path.join(out, "rank%s-%d.json" % (os.environ["RANK"], k)), "w") as f:
        json.dump({"seen": seen, "world_size": int(os.environ["WORLD_SIZE"])}, f)
"""


def _keys(server, bucket: str) -> list[str]:
    response = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in response.get("Contents", []))


def _launch(args: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [COMPOSER, "-n", "2", "--master_port", str(free_port())]
    cmd += ["--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err")] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("rank*.*")) if p.suffix in (".out", ".err"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    return proc


def test_convert_synthetic_to_s3_and_stream_back(s3, tmp_path):  # noqa: F811
    listing = write_synthetic_tree(tmp_path / "src")
    bucket = s3.make_bucket()
    staging = tmp_path / "staging"
    manifest = convert_image_folder(
        tmp_path / "src", f"s3://{bucket}/shapes/train", staging=staging, chunk_files=20, progress=False
    )
    keys = _keys(s3, bucket)
    assert "shapes/train/index.json" in keys and "shapes/train/manifest.json" in keys
    assert [k for k in keys if k.endswith("done.json")] == [f"shapes/train/chunk-0000{k}/done.json" for k in range(3)]
    # staged chunks are deleted once uploaded; the conversion record keeps the folder claimed for this --src
    assert [p.name for p in staging.iterdir()] == ["conversion.json"]
    remote_manifest = json.loads(s3.client().get_object(Bucket=bucket, Key="shapes/train/manifest.json")["Body"].read())
    assert remote_manifest == manifest and manifest["samples"] == 48

    summary = check_remote(f"s3://{bucket}/shapes", split="train")
    assert summary["samples"] == 48 and summary["hashes"] == ["sha1", "xxh64"]
    assert summary["columns"] == {"i": "int", "x": "bytes", "y": "int"}

    images = StreamingImageDataset(
        remote=f"s3://{bucket}/shapes",
        local=str(tmp_path / "cache"),
        split="train",
        image_size=24,
        train=False,
        batch_size=8,
    )
    labels = collections.Counter(label for image, label in images)
    assert labels == {0: 16, 1: 16, 2: 16}
    raw = StreamingDataset(remote=f"s3://{bucket}/shapes", local=str(tmp_path / "cache2"), split="train", batch_size=8)
    for sample in raw:
        rel, label, _ = listing[int(sample["i"])]
        assert int(sample["y"]) == label
        assert sample["x"] == encode_image(tmp_path / "src" / rel)[0]


def test_convert_real_cifar_to_s3_with_the_cli_and_read_back(s3, cifar_jpegs, tmp_path):  # noqa: F811
    bucket = s3.make_bucket()
    cmd = [sys.executable, "-m", "magma_composer.data.convert", "--src", str(cifar_jpegs / "train")]
    cmd += ["--out", f"s3://{bucket}/cifar10/train", "--staging", str(tmp_path / "staging"), "--workers", "2"]
    cmd += ["--shard-size", "16kb", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote 200 images in 10 classes to s3://{bucket}/cifar10/train (0 re-encoded" in proc.stdout
    convert_image_folder(cifar_jpegs / "test", f"s3://{bucket}/cifar10/test", progress=False)
    assert check_remote(f"s3://{bucket}/cifar10", split="test")["samples"] == 200

    listing = list_image_folder(cifar_jpegs / "train")
    raw = StreamingDataset(remote=f"s3://{bucket}/cifar10", local=str(tmp_path / "raw"), split="train", batch_size=8)
    assert raw.num_samples == 200 and len(raw.shards) > 5
    for sample in raw:
        rel, label = listing.files[int(sample["i"])]
        assert sample["x"] == (cifar_jpegs / "train" / rel).read_bytes(), rel  # real JPEGs travel verbatim
        assert int(sample["y"]) == label

    test = StreamingImageDataset(
        remote=f"s3://{bucket}/cifar10",
        local=str(tmp_path / "test"),
        split="test",
        image_size=32,
        train=False,
        batch_size=8,
    )
    seen = [(tuple(image.shape), label) for image, label in test]
    assert len(seen) == 200 and {shape for shape, _ in seen} == {(3, 32, 32)}
    assert collections.Counter(label for _, label in seen) == {c: 20 for c in range(10)}


def test_two_ranks_cover_every_sample_exactly_once(s3, tmp_path, request):  # noqa: F811
    """One ``composer -n 2`` launch streams synthetic images and (when present) real CIFAR-10 JPEGs from S3."""
    write_synthetic_tree(tmp_path / "synthetic")
    sources = [tmp_path / "synthetic"]
    try:
        sources.append(request.getfixturevalue("cifar_jpegs") / "train")
    except pytest.skip.Exception:
        pass  # no real data here: the synthetic images still run
    bucket = s3.make_bucket()
    remotes = []
    for k, src in enumerate(sources):
        convert_image_folder(src, f"s3://{bucket}/ds{k}/train", shard_size="8kb", progress=False)
        remotes.append(f"s3://{bucket}/ds{k}")
    script = tmp_path / "iterate.py"
    script.write_text(RANK_SCRIPT)
    _launch([str(script), str(tmp_path)] + remotes, tmp_path)

    for k, src in enumerate(sources):
        listing = list_image_folder(src)
        ranks = [json.loads((tmp_path / f"rank{r}-{k}.json").read_text()) for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == len(listing.files) // 2
        ids = [i for r in ranks for i, _, _ in r["seen"]]
        assert sorted(ids) == list(range(len(listing.files)))  # every sample once, none twice
        for i, label, digest in ranks[0]["seen"] + ranks[1]["seen"]:
            rel, expected_label = listing.files[i]
            assert label == expected_label, rel
            assert digest == hashlib.sha1(encode_image(src / rel)[0]).hexdigest(), rel
    assert len(sources) == 2 or not (REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz").exists()


#: run on each simulated node by ``composer --world_size 4 --nproc 2 --node_rank N iterate_nodes.py OUT REMOTE``: two
#: epochs, a cache per node, ``{"epochs": [[i, ...], [i, ...]], "node": N}`` per rank to ``OUT/rank<r>.json``
NODE_SCRIPT = """
import json, os, sys
import torch
from magma_composer.data.checked_streaming import CheckedStreamingDataset

out, remote = sys.argv[1], sys.argv[2]
node = int(os.environ["NODE_RANK"])
local = os.path.join(out, "node%d-cache" % node)
dataset = CheckedStreamingDataset(remote=remote, local=local, split="train", batch_size=4, shuffle=True)
loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=list)
epochs = [[int(s["i"]) for batch in loader for s in batch] for _ in range(2)]
with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({"epochs": epochs, "node": node}, f)
"""


def _private_shm_works() -> bool:
    probe = ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_two_nodes_cover_every_sample_exactly_once(s3, tmp_path):  # noqa: F811
    """Two simulated nodes of two ranks each (four composer ranks): every sample once per epoch, across nodes.

    Each node runs in its own mount namespace with a private /dev/shm (streaming keeps its per-node state there, as
    on separate machines) and its own cache folder; the ranks meet over loopback (gloo).
    """
    if not _private_shm_works():
        pytest.skip("simulating two nodes on one machine needs `unshare -m` and `mount` (root) for a private /dev/shm")
    write_synthetic_tree(tmp_path / "src", per_class=32)
    bucket = s3.make_bucket()
    convert_image_folder(tmp_path / "src", f"s3://{bucket}/ds/train", shard_size="8kb", progress=False)
    script = tmp_path / "iterate_nodes.py"
    script.write_text(NODE_SCRIPT)
    port, env = str(free_port()), {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in (0, 1):
        launch = [COMPOSER, "--world_size", "4", "--nproc", "2", "--node_rank", str(node)]
        launch += ["--master_addr", "127.0.0.1", "--master_port", port]
        launch += ["--stdout", str(tmp_path / "rank{rank}.out"), "--stderr", str(tmp_path / "rank{rank}.err")]
        launch += [str(script), str(tmp_path), f"s3://{bucket}/ds"]
        wrapped = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
        wrapped += ['mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node"] + launch
        nodes.append(subprocess.Popen(wrapped, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [proc.communicate(timeout=400)[0].decode(errors="replace") for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill()
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("rank*.*")) if p.suffix in (".out", ".err"))
    assert [proc.returncode for proc in nodes] == [0, 0], "".join(outputs)[-3000:] + logs[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["node"] for r in ranks] == [0, 0, 1, 1]
    for epoch in range(2):
        shares = [r["epochs"][epoch] for r in ranks]
        assert [len(share) for share in shares] == [24] * 4, epoch
        assert sorted(i for share in shares for i in share) == list(range(96)), epoch  # each sample once
    assert [r["epochs"][0] for r in ranks] != [r["epochs"][1] for r in ranks]  # reshuffled between epochs
    for node in (0, 1):  # each node fetched into its own cache
        assert list((tmp_path / f"node{node}-cache" / "train").rglob("shard.*.mds"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cache_limit_evicts_and_fetches_again(s3, tmp_path, num_workers):  # noqa: F811
    """A cache smaller than the data set: shards are evicted and downloaded again, every sample still comes once.

    With two loader workers the two share the cache (and evict each other's shards)."""
    write_synthetic_tree(tmp_path / "src", per_class=16)
    bucket = s3.make_bucket()
    convert_image_folder(tmp_path / "src", f"s3://{bucket}/ds/train", shard_size="4kb", progress=False)
    dataset = CheckedStreamingDataset(
        remote=f"s3://{bucket}/ds", local=str(tmp_path / "cache"), split="train", batch_size=4, cache_limit="16kb"
    )
    assert len(dataset.shards) > 8
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=list)
    for epoch in range(2):
        ids = [int(sample["i"]) for batch in loader for sample in batch]
        assert sorted(ids) == list(range(48)), epoch
        cached = list((tmp_path / "cache" / "train").rglob("shard.*"))
        assert sum(p.stat().st_size for p in cached) <= 16_000 and len(cached) < len(dataset.shards)  # evicted


def test_remote_conversion_resumes(s3, tmp_path, monkeypatch):  # noqa: F811
    listing = write_synthetic_tree(tmp_path / "src", per_class=8)
    bad = tmp_path / "src" / listing[13][0]  # chunk 2 of 5-file chunks
    good = bad.read_bytes()
    bad.write_bytes(good[:40])
    bucket = s3.make_bucket()
    out, staging = f"s3://{bucket}/ds", tmp_path / "staging"

    with pytest.raises(BadImageError, match=str(bad)):
        convert_image_folder(tmp_path / "src", out, staging=staging, chunk_files=5, progress=False)
    assert _keys(s3, bucket) == [
        f"ds/chunk-0000{k}/{n}" for k in range(2) for n in ("done.json", "index.json", "shard.00000.mds")
    ] + ["ds/conversion.json"]

    # an upload that fails leaves its chunk staged; the rerun uploads it without encoding it again
    bad.write_bytes(good)
    real_upload, real_write = convert._upload_chunk, convert._write_chunk
    written = []

    def failing_upload(folder, *args):
        if folder.name == "chunk-00003":
            raise RemoteDataError("simulated upload failure")
        real_upload(folder, *args)

    def counting_write(folder, *args, **kwargs):
        written.append(folder.name)
        return real_write(folder, *args, **kwargs)

    monkeypatch.setattr(convert, "_write_chunk", counting_write)
    monkeypatch.setattr(convert, "_upload_chunk", failing_upload)
    with pytest.raises(RemoteDataError, match="simulated"):
        convert_image_folder(tmp_path / "src", out, staging=staging, chunk_files=5, progress=False)
    assert written[:2] == ["chunk-00002", "chunk-00003"]
    assert (staging / "chunk-00003" / "done.json").is_file()
    assert "ds/index.json" not in _keys(s3, bucket)

    monkeypatch.setattr(convert, "_upload_chunk", real_upload)
    written.clear()
    manifest = convert_image_folder(tmp_path / "src", out, staging=staging, chunk_files=5, progress=False)
    assert "chunk-00003" not in written and "chunk-00002" not in written
    assert manifest["samples"] == 24 and [p.name for p in staging.iterdir()] == ["conversion.json"]
    raw = StreamingDataset(remote=out, local=str(tmp_path / "cache"), batch_size=8)
    assert sorted(int(s["i"]) for s in raw) == list(range(24))


@pytest.mark.slow
def test_train_two_ranks_from_s3(s3, tmp_path):  # noqa: F811
    write_synthetic_tree(tmp_path / "src", per_class=16)
    bucket = s3.make_bucket()
    convert_image_folder(tmp_path / "src", f"s3://{bucket}/shapes/train", progress=False)
    recipe = tiny_recipe(f"s3://{bucket}/shapes", max_duration="3ba", save_folder=str(tmp_path / "ckpt"))
    recipe["train_data"].update(batch_size=8, num_workers=1, local=str(tmp_path / "cache"))
    recipe["save_interval"] = "3ba"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = _launch(["-m", "magma_composer.train", str(path)], tmp_path, timeout=400)
    assert "checkpoint: " in proc.stdout
    assert list((tmp_path / "ckpt").glob("ep*-ba3-rank0.pt"))
    assert list((tmp_path / "cache" / "train").glob("chunk-00000/shard.00000.mds"))  # streamed through the cache
