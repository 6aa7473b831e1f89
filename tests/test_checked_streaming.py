"""CheckedStreamingDataset's own iteration: streaming's samples and order, and a deadline on every wait.

Local folders stand in for the remote here (streaming copies shards from them as it would download them); the
same paths against a real S3 server are in test_s3_streaming.py and test_s3_faults.py.
"""

from __future__ import annotations

import pickle
import threading

import pytest
import torch
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState

from magma_composer.data.checked_streaming import CheckedStreamingDataset, StreamingDataError
from magma_composer.data.convert import convert_image_folder
from tests.s3_server import write_synthetic_tree

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def remote(tmp_path):
    """A folder holding an MDS split ``train`` of 48 samples in small shards, used as the 'remote'."""
    write_synthetic_tree(tmp_path / "src", per_class=16)
    convert_image_folder(tmp_path / "src", tmp_path / "remote" / "train", shard_size="4kb", progress=False)
    return tmp_path / "remote"


def _samples(dataset, num_workers: int) -> list[tuple[int, int, bytes]]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=list)
    return [(int(s["i"]), int(s["y"]), bytes(s["x"])) for batch in loader for s in batch]


@pytest.mark.parametrize("num_workers,download_threads", [(0, 1), (2, 3)])
def test_same_samples_in_the_same_order_as_streaming(remote, tmp_path, num_workers, download_threads):
    kwargs = dict(remote=str(remote), split="train", batch_size=4, shuffle=True, shuffle_seed=7)
    ours = CheckedStreamingDataset(local=str(tmp_path / "ours"), download_threads=download_threads, **kwargs)
    theirs = StreamingDataset(local=str(tmp_path / "theirs"), **kwargs)
    assert len(ours.shards) > 8
    for epoch in range(2):  # the second epoch reshuffles; both must follow
        mine, reference = _samples(ours, num_workers), _samples(theirs, num_workers)
        assert [s[0] for s in mine] == [s[0] for s in reference], epoch
        assert mine == reference  # labels and image bytes too (our reads bypass streaming's reader)
        assert sorted(s[0] for s in mine) == list(range(48))


def test_a_hung_download_fails_at_the_deadline(remote, tmp_path):
    dataset = CheckedStreamingDataset(
        remote=str(remote), local=str(tmp_path / "cache"), split="train", batch_size=4, shard_deadline=1.0
    )
    release = threading.Event()
    stream = dataset.streams[0]
    real_prepare = stream.prepare_shard
    calls = []

    def hung_after_two(shard):
        calls.append(shard)
        if len(calls) > 2:
            release.wait()  # a download that never ends (a dead connection)
        return real_prepare(shard)

    stream.prepare_shard = hung_after_two
    seen = []
    try:
        with pytest.raises(StreamingDataError, match=r"was not ready within shard_deadline=1 s") as error:
            for sample in dataset:
                seen.append(int(sample["i"]))
    finally:
        release.set()
    assert "shard.0000" in str(error.value) and str(remote) in str(error.value)
    assert 0 < len(seen) < 48  # the samples of the shards that did arrive came first


def test_a_shard_stuck_in_another_worker_fails_at_the_deadline(remote, tmp_path):
    dataset = CheckedStreamingDataset(
        remote=str(remote), local=str(tmp_path / "cache"), split="train", batch_size=4, shard_deadline=0.5
    )
    dataset._shard_states[3] = _ShardState.PREPARING  # as left by a loader worker killed during its download
    with pytest.raises(StreamingDataError, match="in preparation by another loader worker or rank for more than"):
        dataset.prepare_shard(3)
    with pytest.raises(StreamingDataError, match="in preparation by another loader worker"):
        list(dataset)


def test_random_access_pickling_and_forking_during_iteration(remote, tmp_path):
    dataset = CheckedStreamingDataset(remote=str(remote), local=str(tmp_path / "cache"), split="train", batch_size=4)
    iterator = iter(dataset)
    first = next(iterator)  # an iteration in progress: fetcher threads and open files
    assert dataset[int(first["i"])]["x"] == first["x"]  # the converter writes samples in id order
    copy = pickle.loads(pickle.dumps(dataset))  # what a 'spawn' DataLoader does
    assert sorted(int(s["i"]) for s in copy) == list(range(48))
    forked = sorted(s[0] for s in _samples(dataset, num_workers=2))  # workers forked with this process's fetcher
    assert forked == list(range(48))
    assert len(list(iterator)) == 47


@pytest.mark.parametrize("bad", [dict(download_threads=0), dict(shard_deadline=-1.0)])
def test_bad_options_are_refused(remote, tmp_path, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        CheckedStreamingDataset(remote=str(remote), local=str(tmp_path / "c"), split="train", batch_size=4, **bad)


def _steal_prefixes(monkeypatch, times: int) -> list:
    """Another process takes the prefix streaming found before streaming creates it, ``times`` times in a row."""
    from multiprocessing import shared_memory

    from streaming.base.shared import prefix

    search, taken, attempts = prefix._check_and_find_retrying, {}, []

    def racing_search(streams_local, streams_remote, shm_name, retry):
        if shm_name == "locals":  # the first search of each attempt
            attempts.append(shm_name)
        found = search(streams_local, streams_remote, shm_name=shm_name, retry=retry)
        # streaming takes the largest prefix its searches found: take each one found, until `times` attempts
        if len(attempts) <= times and found not in taken:
            taken[found] = shared_memory.SharedMemory(name=f"{found:06}_locals", create=True, size=8)
        return found

    monkeypatch.setattr(prefix, "_check_and_find_retrying", racing_search)
    return attempts, taken


def test_a_prefix_taken_by_another_process_is_searched_again(remote, tmp_path, monkeypatch):
    attempts, taken = _steal_prefixes(monkeypatch, times=2)
    try:
        dataset = CheckedStreamingDataset(remote=str(remote), local=str(tmp_path / "c"), split="train", batch_size=4)
        assert len(attempts) == 3  # lost the race twice, came up on the third search
        assert sorted(int(s["i"]) for s in dataset) == list(range(48))
        dataset.release()
    finally:
        for shm in taken.values():
            shm.close()
            shm.unlink()


def test_a_prefix_race_lost_every_time_is_one_clear_error(remote, tmp_path, monkeypatch):
    attempts, taken = _steal_prefixes(monkeypatch, times=100)
    try:
        with pytest.raises(RuntimeError, match="another process took streaming's shared-memory name .*_locals"):
            CheckedStreamingDataset(remote=str(remote), local=str(tmp_path / "c"), split="train", batch_size=4)
        assert len(attempts) == 5
    finally:
        for shm in taken.values():
            shm.close()
            shm.unlink()
