"""A :class:`streaming.StreamingDataset` that checks its data first, reads fast and never waits without a deadline.

``mosaicml-streaming`` 0.13 iterates with three threads per loader worker (download, "ready" and yield loops) that
hand every sample to each other through busy-waiting, and a shard evicted by ``cache_limit`` while the ready loop
waits for it is never fetched again (the epoch blocks for good); a hung endpoint blocks in the same way, and a
failed download silently ends the epoch early. :class:`CheckedStreamingDataset` keeps streaming's index, shard
readers, partitioning, shuffling, resumption state and cache accounting, and replaces the iteration:

* the samples of a worker come from streaming's own ``_get_work`` (same order, same resumption);
* shards are fetched ahead by ``download_threads`` daemon threads, each shard once, ``predownload`` samples
  before it is first needed; the yield loop waits for a shard with a deadline (``shard_deadline``) and raises a
  :class:`StreamingDataError` naming the shard and the endpoint when the deadline passes or the download fails;
* a shard evicted before its samples are read is fetched again, through the same deadline;
* an MDS sample is read with two ``pread`` calls on a cached file descriptor instead of an ``open``/``seek``/
  ``read``/``close`` per sample;
* S3 downloads use a client with bounded connect and read timeouts (streaming leaves the connect timeout at
  botocore's 60 s) and a bounded number of attempts.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np
from composer.utils import dist as composer_dist
from streaming import StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState
from streaming.base.format.mds.reader import MDSReader
from streaming.base.shared import SharedArray
from streaming.base.storage.download import S3Downloader

from magma_composer.data.storage import check_remote, explain_s3_error, join_url
from magma_composer.options import check_choice, check_int, check_number

__all__ = ["CheckedStreamingDataset", "StreamingDataError"]

log = logging.getLogger(__name__)

# plain ints: comparing a shared-memory uint8 with the IntEnum is slow (docs/benchmarks.md, data pipeline)
_LOCAL, _REMOTE, _PREPARING = int(_ShardState.LOCAL), int(_ShardState.REMOTE), int(_ShardState.PREPARING)
_OPEN_SHARDS = 8  # file descriptors kept open per loader worker
#: the attributes of a streaming data set that hold its shared memory or views into it
_SHARED_ATTRIBUTES = (
    "_locals_shm",
    "_resume_shm",
    "_shared_barrier",
    "_next_epoch",
    "_cache_usage",
    "_shard_states",
    "_shard_access_times",
)
_BOTO_ATTEMPTS = 3  # attempts per request inside one streaming download attempt


class StreamingDataError(RuntimeError):
    """A shard could not be downloaded, failed its hash check or was not ready in time; the message names it."""


class _BoundedS3Downloader(S3Downloader):
    """streaming's S3 downloader with a connect timeout, ``standard`` retries and one transfer attempt per call.

    streaming's own client waits up to botocore's default 60 s for a connection and lets ``s3transfer`` repeat a
    timed-out body read five times inside every one of streaming's attempts; here a request takes at most
    ``_BOTO_ATTEMPTS x (connect + read timeout)``, and streaming's ``download_retry`` repeats it.
    """

    def _create_s3_client(self, unsigned: bool = False, timeout: float = 60.0) -> Any:
        from boto3.session import Session
        from botocore import UNSIGNED
        from botocore.config import Config

        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"mode": "standard", "total_max_attempts": _BOTO_ATTEMPTS},  # max_attempts counts retries
            signature_version=UNSIGNED if unsigned else None,
        )
        self._s3_client = Session().client("s3", config=config, endpoint_url=os.environ.get("S3_ENDPOINT_URL"))

    def _download_file_impl(self, remote: str, local: str, timeout: float) -> None:
        import urllib.parse

        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import NoCredentialsError

        if self._s3_client is None:
            try:
                self._create_s3_client(timeout=timeout)
            except NoCredentialsError:  # a public bucket read without credentials, as streaming does
                self._create_s3_client(unsigned=True, timeout=timeout)
        url = urllib.parse.urlparse(remote)
        extra = {"RequestPayer": "requester"} if url.netloc in self._requester_pays_buckets else {}
        self._s3_client.download_file(
            url.netloc,
            url.path.lstrip("/"),
            local,
            ExtraArgs=extra,
            Config=TransferConfig(use_threads=False, num_download_attempts=1),
        )


class _ShardFetcher:
    """Daemon threads that prepare shards in the order they are submitted; waiting on a shard has a deadline.

    Daemon threads, not a ``ThreadPoolExecutor``: a thread stuck on a dead connection must not keep a loader
    worker (or the interpreter) from exiting.
    """

    def __init__(self, prepare: Callable[[int], None], threads: int) -> None:
        self._prepare = prepare
        self.pid = os.getpid()
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._done: dict[int, threading.Event] = {}
        self._errors: dict[int, BaseException] = {}
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._run, name=f"shard-fetcher-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, shard_id: int, again: bool = False) -> None:
        """Queues ``shard_id`` unless it was queued before (``again``: queue it once more, e.g. after eviction)."""
        if shard_id in self._done and not (again and self._done[shard_id].is_set()):
            return
        self._errors.pop(shard_id, None)
        self._done[shard_id] = threading.Event()
        self._queue.put(shard_id)

    def wait(self, shard_id: int, timeout: float) -> bool:
        """Waits until ``shard_id`` is prepared; ``False`` after ``timeout`` seconds; re-raises its failure."""
        self.submit(shard_id)
        if not self._done[shard_id].wait(timeout):
            return False
        error = self._errors.get(shard_id)
        if error is not None:
            raise error
        return True

    def stop(self) -> None:
        """Lets the threads end after their current shard; nothing waits for them."""
        self._stopped = True
        for _ in self._threads:
            self._queue.put(None)

    def _run(self) -> None:
        while True:
            shard_id = self._queue.get()
            if shard_id is None or self._stopped:
                return
            try:
                self._prepare(shard_id)
            except BaseException as error:  # handed to the waiting iteration
                self._errors[shard_id] = error
            finally:
                self._done[shard_id].set()


def _remote_of(stream: Any) -> str | None:
    """Where a stream's shards come from (its remote and split), or ``None`` for a local-only stream."""
    if not stream.remote:
        return None
    return join_url(stream.remote, stream.split) if stream.split else stream.remote


def _explain_shard_error(error: BaseException, remote: str | None, local: str, basename: str) -> str:
    url = join_url(remote, basename) if remote else None
    if isinstance(error, ValueError) and str(error).startswith("Checksum failure"):
        return (
            f"shard {basename} of {remote or local} failed its hash check: its bytes differ from those recorded in "
            f"index.json when it was written (corrupted in storage or in transit); the local copy was deleted. "
            f"Re-upload the shard or convert the data set again"
        )
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency of streaming's S3 support
        BotoCoreError = ClientError = ()  # noqa: N806
    if url and url.startswith("s3://") and isinstance(error, (BotoCoreError, ClientError)):
        return explain_s3_error(error, url, "download shard") + " (after the download retries)"
    return f"cannot prepare shard {basename} of {remote or local} (after retries): {type(error).__name__}: {error}"


#: shared memory that could not be closed at its data set's release because a view of it was alive
_PENDING: list[Any] = []


def _free(shm: Any) -> bool:
    """Closes (and unlinks, if this process made it) one streaming shared memory; False while a view is alive, in
    which case it stays registered to be freed at exit."""
    atexit.unregister(shm.cleanup)
    try:
        shm.cleanup()
    except BufferError:
        atexit.register(shm.cleanup)
        return False
    return True


@contextlib.contextmanager
def _closing_prefix_probes() -> Iterator[None]:
    """Closes the shared memory that streaming's prefix search opens while a data set is made.

    To pick a free prefix, streaming opens the shared memory of every live data set in the process and never closes
    it (it stays registered until exit): a process that makes data set after data set (a notebook, a sweep, a test
    suite) would run out of file descriptors. Only the search's probes are closed; what the data set keeps is not.
    """
    from streaming.base.shared import prefix

    search = prefix._check_and_find
    opened: list[Any] = []

    def probing_search(*args: Any, **kwargs: Any) -> Any:
        original = prefix.SharedMemory

        def probe(*a: Any, **k: Any) -> Any:
            shm = original(*a, **k)
            opened.append(shm)
            return shm

        prefix.SharedMemory = probe
        try:
            return search(*args, **kwargs)
        finally:
            prefix.SharedMemory = original

    prefix._check_and_find = probing_search
    try:
        yield
    finally:
        prefix._check_and_find = search
        for shm in opened:
            _free(shm)


class CheckedStreamingDataset(StreamingDataset):
    """A :class:`streaming.StreamingDataset` that checks its data set first, fails loudly and never hangs.

    Same arguments as :class:`streaming.StreamingDataset` (``remote``, ``local``, ``split``, ``batch_size``,
    ``shuffle``, ``predownload``, ``cache_limit``, ``download_retry``, ``download_timeout``, ...), and:

    * before anything else, :func:`~magma_composer.data.storage.check_remote` reads ``remote/split/index.json``
      (or ``local/split`` without a remote) and raises a
      :class:`~magma_composer.data.storage.RemoteDataError` naming the endpoint, bucket and prefix when it cannot;
    * ``validate_hash='auto'`` (the default) checks every downloaded shard with ``xxh64`` (or another hash the
      index carries; none when it carries none);
    * a shard that cannot be downloaded (after the retries), fails its hash check, or is not ready within
      ``shard_deadline`` seconds raises :class:`StreamingDataError` naming the shard, the endpoint and the cause,
      out of the iteration (through a ``DataLoader`` worker too), and its local copy is deleted so that the cache
      holds no corrupt file. After such an error the object stays failed: build a new one to retry;
    * iteration is this module's own (see the module's documentation): same samples in the same order as
      streaming's, fetched ahead by ``download_threads`` threads, read without per-sample locking.

    Checks are skipped for data sets given as ``streams``.

    Args:
        *args: passed to :class:`streaming.StreamingDataset`.
        validate_hash (str, optional): hash algorithm to check downloaded shards with; ``'auto'`` picks one the
            index carries; ``None`` checks nothing.
        download_threads (int): shards downloaded at the same time per loader worker.
        shard_deadline (float, optional): seconds the iteration waits for one shard (its download, retries
            included, or another worker's download of it) before it raises. Default: from ``download_timeout``
            and ``download_retry``, the longest a download can take with this module's bounded S3 client
            (about 12 minutes with streaming's defaults of 60 s and 2 attempts).
        same_every_pass (bool): every pass (``iter``) yields the first epoch's samples in the first epoch's order,
            instead of streaming's new shuffle and new subset each epoch: for evaluation sets, whose figures must
            come from the same images each time they are measured, however many of the first are read.
        **kwargs: passed to :class:`streaming.StreamingDataset`.
    """

    def __init__(
        self,
        *args: Any,
        validate_hash: str | None = "auto",
        download_threads: int = 1,
        shard_deadline: float | None = None,
        same_every_pass: bool = False,
        **kwargs: Any,
    ) -> None:
        check_int("download_threads", download_threads, 1)
        if shard_deadline is not None:
            check_number("shard_deadline", shard_deadline, 0.0, open_min=True)
        # streaming's own options that it would accept and then misuse
        if "download_timeout" in kwargs:
            check_number("download_timeout", kwargs["download_timeout"], 0.0, open_min=True)
        for key in ("download_retry", "predownload", "num_canonical_nodes", "batch_size", "shuffle_block_size"):
            if kwargs.get(key) is not None:
                check_int(key, kwargs[key], 0 if key == "predownload" else 1)
        if "shuffle_algo" in kwargs:
            from streaming.base.shuffle import algos

            check_choice("shuffle_algo", kwargs["shuffle_algo"], sorted(algos))
        if validate_hash not in (None, "auto"):
            from streaming.base.hashing import get_hashes

            check_choice("validate_hash", validate_hash, ("auto", None, *sorted(get_hashes())))
        if kwargs.get("streams") is None:
            remote, local, split = kwargs.get("remote"), kwargs.get("local"), kwargs.get("split")
            summary = check_remote(
                remote if remote is not None else local, split, timeout=min(10.0, kwargs.get("download_timeout", 10.0))
            )
            if validate_hash == "auto":
                hashes = summary.get("hashes") or []
                validate_hash = "xxh64" if "xxh64" in hashes else (hashes[0] if hashes else None)
        elif validate_hash == "auto":
            validate_hash = None
        # streaming finds a free shared-memory prefix, then creates it: another process starting a data set in
        # between takes the same prefix and this one fails with FileExistsError; a single rank searches again
        attempts = 5 if composer_dist.get_local_world_size() == 1 else 1
        for attempt in range(attempts):
            try:
                with _closing_prefix_probes():
                    super().__init__(*args, validate_hash=validate_hash, **kwargs)
                break
            except FileExistsError as exc:
                if attempt + 1 == attempts:
                    raise RuntimeError(
                        f"another process took streaming's shared-memory name {exc.filename} while this data set "
                        "was being made; start the runs a few seconds apart"
                    ) from None
                time.sleep(0.2 * (attempt + 1))
        for stream in self.streams:
            if stream.remote is not None and str(stream.remote).startswith("s3://"):
                stream._downloader = _BoundedS3Downloader()
        self.download_threads = download_threads
        self.same_every_pass = bool(same_every_pass)
        self.shard_deadline = float(shard_deadline) if shard_deadline is not None else self._default_deadline()
        self._is_mds = [isinstance(shard, MDSReader) for shard in self.shards]

    def _default_deadline(self) -> float:
        """The longest one shard's download can take: every attempt timing out on connect and read, plus backoffs."""
        worst = 0.0
        for stream in self.streams:
            attempts = max(1, int(stream.download_retry))
            per_attempt = _BOTO_ATTEMPTS * 2 * float(stream.download_timeout) + 2.0**_BOTO_ATTEMPTS
            worst = max(worst, attempts * per_attempt + 2.0**attempts)
        return worst + 10.0

    def release(self) -> None:
        """Frees the shared memory this data set holds in this process now, rather than at exit.

        streaming keeps every data set's shared memory until the process exits, and each new data set opens that
        of all earlier ones, so a process that builds many (a notebook, a test suite, a failed recipe build)
        runs out of file descriptors. The data set cannot be iterated afterwards.
        """
        shms = [self.__dict__.get(name) for name in ("_locals_shm", "_resume_shm")]
        barrier = self.__dict__.get("_shared_barrier")
        shms.append(barrier._arr.shm if barrier is not None else None)
        shms += [getattr(self.__dict__.get(n), "arr", None) for n in ("_next_epoch", "_cache_usage")]
        shms += [self.__dict__.get(n) for n in ("_shard_states", "_shard_access_times")]
        shms = [shm.shm if isinstance(shm, SharedArray) else shm for shm in shms]
        self._close_files()
        # the NumPy views into the memory live in these attributes: while one is alive the memory cannot be closed
        for name in _SHARED_ATTRIBUTES:
            self.__dict__.pop(name, None)
        barrier = None
        # memory that a still-alive view kept open at an earlier release (e.g. a Trainer's loader iterator) is
        # usually free now
        _PENDING[:] = [shm for shm in _PENDING if not _free(shm)]
        _PENDING.extend(shm for shm in shms if shm is not None and not _free(shm))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # threads, file descriptors and locks stay in their process
        for name in ("_fetcher", "_open_files", "_cache_filelock"):
            state.pop(name, None)
        barrier = state.get("_shared_barrier")
        if barrier is not None and hasattr(barrier, "lock"):  # its file lock is made again where it is needed
            barrier = state["_shared_barrier"] = copy.copy(barrier)
            del barrier.lock
        return state

    # -- shard preparation -------------------------------------------------------------------------------------

    def _forget_inherited_locks(self) -> None:
        """Drops file locks made in a parent process: filelock refuses to use one inherited through ``fork``.

        Loader workers forked after this process iterated (an evaluation in the main process, say) would fail
        otherwise, with streaming's own iteration too.
        """
        if getattr(self, "_locks_pid", None) == os.getpid():
            return
        if hasattr(self._shared_barrier, "lock"):
            del self._shared_barrier.lock  # streaming makes it again when it is missing
        if hasattr(self, "_cache_filelock"):
            del self._cache_filelock
        self._locks_pid = os.getpid()

    def _cache_lock(self) -> Any:
        self._forget_inherited_locks()
        if not hasattr(self, "_cache_filelock"):  # created lazily: a FileLock holds a threading lock (unpicklable)
            from filelock import FileLock

            self._cache_filelock = FileLock(self._cache_filelock_path)
        return self._cache_filelock

    def _raw_path(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw_info, _ = self.shards[shard_id].file_pairs[0]
        return os.path.join(stream.local, stream.split or "", raw_info.basename)

    def _make_room(self, shard_id: int) -> None:
        """Evicts the least recently used local shards until ``shard_id`` fits under ``cache_limit`` (lock held).

        When every other shard is being downloaded (nothing local to evict), the download goes ahead over the
        limit, with a warning, instead of failing while holding the cache lock as streaming does.
        """
        need = self.shards[shard_id].get_max_size()
        while self.cache_limit < self.cache_usage + need:
            states = self._shard_states.numpy()
            local = np.flatnonzero(states == _LOCAL)
            local = local[local != shard_id]
            if local.size == 0:
                log.warning(
                    "cache_limit %d bytes is exceeded while shards are downloading in parallel (usage %d + %d); "
                    "raise cache_limit to avoid this",
                    self.cache_limit,
                    self.cache_usage,
                    need,
                )
                return
            times = self._shard_access_times.numpy()[local]
            self._evict_shard(int(local[np.argmin(times)]))

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Makes a shard local (download, hash check, decompression), evicting others to stay under ``cache_limit``.

        Safe across threads, loader workers and ranks of a node (the cache's file lock). A shard another worker
        is preparing is waited for (``blocking``) for at most ``shard_deadline`` seconds.

        Raises:
            StreamingDataError: the shard cannot be downloaded or fails its hash check (its local files are
                removed), another worker's preparation of it takes longer than ``shard_deadline``, or an earlier
                shard of this object already failed.
        """
        failure = getattr(self, "_first_failure", None)
        if failure is not None:  # one failed shard ends the epoch: no new downloads (and timeouts) after it
            raise StreamingDataError(str(failure))
        lock = self._cache_lock()
        deadline = None
        while True:
            with lock:
                state = self._shard_states[shard_id]
                if state == _LOCAL and os.path.isfile(self._raw_path(shard_id)):
                    self._shard_access_times[shard_id] = time.time_ns()
                    return
                if state in (_LOCAL, _REMOTE):  # LOCAL without the raw file: a zip to decompress
                    self._shard_states[shard_id] = _PREPARING
                    if state == _REMOTE and self.cache_limit:
                        try:
                            self._make_room(shard_id)
                        except BaseException:
                            self._shard_states[shard_id] = _REMOTE
                            raise
                    break
                if state != _PREPARING:
                    raise RuntimeError(f"invalid state {state} of shard {shard_id}")
            if not blocking:
                return
            deadline = deadline or time.monotonic() + self.shard_deadline
            if time.monotonic() > deadline:
                raise StreamingDataError(
                    f"shard {self._raw_path(shard_id)} has been in preparation by another loader worker or rank for "
                    f"more than shard_deadline={self.shard_deadline:g} s; that worker may have failed or hung (see "
                    f"its error), or the object store is too slow: raise download_timeout / shard_deadline"
                )
            time.sleep(TICK)

        stream = self.streams[self.stream_per_shard[shard_id]]
        try:
            delta = stream.prepare_shard(self.shards[shard_id])
        except BaseException as error:
            raise self._fail_shard(shard_id, error) from error
        with lock:
            self.cache_usage += delta
            self._shard_access_times[shard_id] = time.time_ns()
            self._shard_states[shard_id] = _LOCAL

    def _fail_shard(self, shard_id: int, error: BaseException) -> StreamingDataError:
        stream = self.streams[self.stream_per_shard[shard_id]]
        basenames = [info.basename for pair in self.shards[shard_id].file_pairs for info in pair if info is not None]
        folder = os.path.join(stream.local, stream.split or "")
        with self._cache_lock():
            for name in basenames:
                for path in (os.path.join(folder, name), os.path.join(folder, name) + ".tmp"):
                    if os.path.isfile(path):
                        os.remove(path)
            self._shard_states[shard_id] = _REMOTE  # others may try again instead of waiting for it
        failure = StreamingDataError(_explain_shard_error(error, _remote_of(stream), folder, basenames[-1]))
        if getattr(self, "_first_failure", None) is None:
            self._first_failure = failure
        return failure

    # -- reading -----------------------------------------------------------------------------------------------

    def _read_mds(self, shard_id: int, index: int) -> bytes:
        """Sample ``index`` of MDS shard ``shard_id`` through a cached descriptor (``FileNotFoundError`` if gone)."""
        files: OrderedDict[int, int] | None = getattr(self, "_open_files", None)
        if files is None:
            files = self._open_files = OrderedDict()
        fd = files.get(shard_id)
        if fd is None:
            fd = os.open(self._raw_path(shard_id), os.O_RDONLY)
            files[shard_id] = fd
            if len(files) > _OPEN_SHARDS:
                os.close(files.popitem(last=False)[1])
        else:
            files.move_to_end(shard_id)
        begin, end = struct.unpack("<II", os.pread(fd, 8, 4 + 4 * index))
        data = os.pread(fd, end - begin, begin)
        if len(data) != end - begin:
            raise RuntimeError(f"{self._raw_path(shard_id)} is truncated at sample {index}")
        return data

    def _close_files(self) -> None:
        files = getattr(self, "_open_files", None)
        while files:
            os.close(files.popitem()[1])

    def _ensure_shard(self, shard_id: int, again: bool = False) -> None:
        """Prepares ``shard_id`` through the running fetcher (with the deadline) or, outside an iteration, here."""
        fetcher: _ShardFetcher | None = getattr(self, "_fetcher", None)
        if fetcher is None or fetcher.pid != os.getpid():
            self.prepare_shard(shard_id)
            return
        if again:
            fetcher.submit(shard_id, again=True)
        # a little longer than the fetcher's own waits, so that its more specific error comes first
        if not fetcher.wait(shard_id, self.shard_deadline * 1.1 + 1.0):
            stream = self.streams[self.stream_per_shard[shard_id]]
            where = _remote_of(stream) or os.path.join(stream.local, stream.split or "")
            raise StreamingDataError(
                f"shard {self.shards[shard_id].file_pairs[0][0].basename} of {where} was not ready within "
                f"shard_deadline={self.shard_deadline:g} s (download_timeout={stream.download_timeout:g} s, "
                f"download_retry={stream.download_retry}); the object store may be hung or unreachable"
            )

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """Sample ``sample_id``, fetching its shard first when it is not local (or was evicted meanwhile).

        Raises:
            StreamingDataError: the shard cannot be fetched, or was evicted ``retry + 1`` times before it could be
                read (``cache_limit`` too small for the loader workers and ranks sharing it).
        """
        shard_id, index = self.spanner[sample_id]
        shard = self.shards[shard_id]
        for attempt in range(1 + retry):
            if self._shard_states[shard_id] == _LOCAL:
                try:
                    if self._is_mds[shard_id]:
                        sample = shard.decode_sample(self._read_mds(shard_id, index))
                    else:
                        sample = shard[index]
                except FileNotFoundError:
                    pass
                else:
                    self._shard_access_times[shard_id] = time.time_ns()
                    return sample
            files = getattr(self, "_open_files", None)
            if files and shard_id in files:
                os.close(files.pop(shard_id))
            self._ensure_shard(shard_id, again=attempt > 0)
        raise StreamingDataError(
            f"shard {shard.file_pairs[0][0].basename} was evicted {retry + 1} times before sample {sample_id} could be "
            f"read: cache_limit={self.cache_limit} bytes is too small for the loader workers and ranks sharing this "
            f"cache; raise cache_limit (or lower predownload)"
        )

    # -- iteration ---------------------------------------------------------------------------------------------

    def _stop_iteration(self) -> None:
        fetcher = getattr(self, "_fetcher", None)
        if fetcher is not None:
            if fetcher.pid == os.getpid():  # one inherited through fork has no threads here: leave its queue be
                fetcher.stop()
            self._fetcher = None
        self._close_files()

    def __iter__(self) -> Iterator[Any]:
        """This worker's samples of the next (or the resumed) epoch, in streaming's order, shards fetched ahead."""
        self._stop_iteration()  # an earlier epoch's iteration, abandoned or finished
        self._forget_inherited_locks()
        failure = getattr(self, "_first_failure", None)
        if failure is not None:
            raise StreamingDataError(str(failure))
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        epoch, sample_in_epoch = self._resume_incr_epoch()
        # streaming's shuffle and subset are drawn from (seed, epoch): epoch 0's, every pass
        sample_ids = self._get_work(0 if self.same_every_pass else epoch, sample_in_epoch)
        sample_ids = sample_ids[sample_ids >= 0]  # -1 pads partitions to equal length
        if not len(sample_ids):
            return
        shard_ids = np.searchsorted(self.sample_offset_per_shard, sample_ids, side="right") - 1
        first_shards, first_positions = np.unique(shard_ids, return_index=True)
        order = np.argsort(first_positions, kind="stable")
        plan = list(zip(first_positions[order].tolist(), first_shards[order].tolist()))
        ahead = len(sample_ids) if self.predownload is None else int(self.predownload)

        fetcher = self._fetcher = _ShardFetcher(self.prepare_shard, self.download_threads)
        ready = bytearray(self.num_shards)
        planned = 0
        try:
            for position, (sample_id, shard_id) in enumerate(zip(sample_ids.tolist(), shard_ids.tolist())):
                while planned < len(plan) and plan[planned][0] <= position + ahead:
                    fetcher.submit(plan[planned][1])
                    planned += 1
                if not ready[shard_id]:
                    self._ensure_shard(shard_id)
                    ready[shard_id] = 1
                yield self[sample_id]
        finally:
            if getattr(self, "_fetcher", None) is fetcher:
                self._stop_iteration()
            else:
                fetcher.stop()
