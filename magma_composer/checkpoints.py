"""Checkpoints that belong to one run, output paths checked before the work, and hashes beside what is written.

A training run and the files it writes are tied together here:

* :func:`check_output_folder` and :func:`check_output_file` refuse an output path before any work is done
  (a file where a folder is wanted, a folder that cannot be written, an existing file that would be replaced).
* :func:`write_atomic` writes through a temporary file in the same folder and renames it into place, so a
  failed write leaves neither a half-written file nor a ``.tmp`` behind; :func:`write_with_hash` also writes
  ``<file>.sha256`` (in ``sha256sum`` format, so ``sha256sum -c`` checks it too).
* :class:`RunRecord` is the ``run.json`` a run writes into its ``save_folder``; :func:`guard_run` reads it
  before the Trainer is built, so a run never writes into, or resumes from, another run's folder, and never
  resumes a model whose parameter shapes differ from the checkpoints'.
* :class:`CheckpointHashes` writes ``<checkpoint>.sha256`` beside every checkpoint Composer's
  ``CheckpointSaver`` writes; :func:`verify_checkpoint` refuses a truncated or altered checkpoint, naming it,
  before Composer loads it (Composer's own loading says only "failed finding central directory", or loads a
  checkpoint with a flipped byte without noticing).

Remote locations (``s3://...``) are not checked here: Composer uploads checkpoints there itself, and the checks
above are about the local file system.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist, is_tar
from composer.utils.compression import is_compressed_pt

from magma_composer import __version__
from magma_composer.data.storage import is_remote

__all__ = [
    "HASH_SUFFIX",
    "LATEST_CHECKPOINT",
    "RUN_RECORD",
    "ENCODER_SIDECAR_FORMAT",
    "ENCODER_SIDECAR_SUFFIX",
    "CheckpointError",
    "CheckpointHashes",
    "RunRecord",
    "check_output_file",
    "check_output_folder",
    "export_encoder",
    "file_sha256",
    "guard_run",
    "latest_checkpoint",
    "resolve_run_name",
    "verify_checkpoint",
    "write_atomic",
    "write_with_hash",
]

#: The run record a run writes into its save folder.
RUN_RECORD = "run.json"
#: The suffix of the hash file written beside a checkpoint or an exported file.
HASH_SUFFIX = ".sha256"
#: The suffix of the architecture record :func:`export_encoder` writes beside an exported encoder.
ENCODER_SIDECAR_SUFFIX = ".json"
#: The ``format`` tag of that record.
ENCODER_SIDECAR_FORMAT = "magma_composer.encoder/1"
#: The symlink to the newest checkpoint that Composer writes (``save_latest_filename`` for rank 0) and autoresume reads.
LATEST_CHECKPOINT = "latest-rank0.pt"

_CHUNK = 4 << 20  # bytes per read when hashing: a streaming read, never the whole file in memory
_PROBE_PREFIX = ".magma-write-probe-"


class CheckpointError(ValueError):
    """An output path, a run's save folder or a checkpoint is refused; the message names the path and what to do."""


# ---------------------------------------------------------------------------------------------------- output paths
def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a folder, or a file that blocks the path)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _probe_writable(folder: Path, what: str, path: str) -> None:
    """Creates and removes a uniquely named file in ``folder``: the only test that sees permissions, read-only
    mounts and full disks alike (``os.access`` is wrong for root and for some file systems)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
    except OSError as exc:
        where = "" if folder == Path(path) else f" (its nearest existing folder {folder} cannot be written)"
        raise CheckpointError(f"{what}: cannot write to {path}{where}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def _check_writable_folder(folder: Path, what: str, path: str) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        kind = "a file" if existing.exists() else "a broken symbolic link"
        if existing == Path(path):
            raise CheckpointError(
                f"{what}: {path} is {kind}, not a folder; give a folder path (it is created if missing)"
            )
        raise CheckpointError(f"{what}: {path} cannot be created: {existing} is {kind}, not a folder")
    _probe_writable(existing, what, path)


def check_output_folder(path: str, what: str) -> None:
    """Checks, before any work, that ``path`` is a folder this process can create and write.

    Nothing is created: a missing folder is accepted when its nearest existing ancestor is a folder that can be
    written (probed by creating and removing a uniquely named file). Remote URIs (``s3://...``) are not checked
    here; Composer and the storage client report their own errors for them.

    Args:
        path (str): the output folder.
        what (str): the option it comes from, for the message (e.g. ``'save_folder'``).

    Raises:
        CheckpointError: ``path`` is a file, lies under a file, or cannot be written.
    """
    if is_remote(path):
        return
    _check_writable_folder(Path(path), what, path)


def check_output_file(path: str, what: str, overwrite: bool = False, overwrite_option: str | None = None) -> None:
    """Checks, before any work, that a file can be written at ``path``.

    Remote URIs (``s3://...``) are not checked here.

    Args:
        path (str): the output file.
        what (str): the option it comes from, for the message (e.g. ``'export_encoder'``).
        overwrite (bool): accept an existing file (it is replaced atomically when written).
        overwrite_option (str, optional): how the user allows overwriting (e.g. ``'--overwrite'``), named in
            the message when an existing file is refused.

    Raises:
        CheckpointError: ``path`` is a folder, an existing file (unless ``overwrite``), or its folder cannot be
            created or written.
    """
    if is_remote(path):
        return
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(f"{what}: {path} is a folder; give a file path (e.g. {target / 'encoder.pt'})")
    if os.path.lexists(target) and not overwrite:
        how = f"set {overwrite_option} to replace it" if overwrite_option else "remove it first to replace it"
        size = f" ({target.stat().st_size} bytes)" if target.exists() else ""
        raise CheckpointError(f"{what}: {path} already exists{size}; choose another path, or {how}")
    _check_writable_folder(target.parent, what, path)


# ---------------------------------------------------------------------------------------------------- writing
def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in chunks (a multi-gigabyte checkpoint is never held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], Any]) -> str:
    """Writes a file through a temporary file in the same folder, then renames it into place.

    A reader sees the old file or the whole new one, never a part. If ``write_fn`` (or anything up to the
    rename) fails, the temporary file is removed, an existing file at ``path`` is left as it was, and the
    exception propagates.

    Args:
        path (str | PathLike): the file to write; its folder is created if missing.
        write_fn (Callable[[IO[bytes]], Any]): writes the content to the binary file object it is given
            (e.g. ``lambda f: torch.save(obj, f)``).

    Returns:
        str: the sha256 of the bytes written (hashed from the temporary file before the rename).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def _write_hash_file(path: Path, digest: str) -> None:
    line = f"{digest}  {path.name}\n".encode()
    write_atomic(str(path) + HASH_SUFFIX, lambda f: f.write(line))


def write_with_hash(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], Any]) -> str:
    """:func:`write_atomic`, then ``<path>.sha256`` beside it (``sha256sum`` format).

    A stale hash file of the file being replaced is removed before the rename, so a crash in between leaves a
    file without a hash (checked by structure) rather than a new file with the old file's hash.

    Returns:
        str: the sha256 of the bytes written.
    """
    target = Path(path)
    hash_path = Path(str(target) + HASH_SUFFIX)

    def write_and_unhash(f: IO[bytes]) -> None:
        write_fn(f)
        hash_path.unlink(missing_ok=True)

    digest = write_atomic(target, write_and_unhash)
    _write_hash_file(target, digest)
    return digest


def export_encoder(model: torch.nn.Module, path: str) -> str:
    """Writes the encoder's timm state dict, atomically, with ``<path>.sha256`` and ``<path>.json`` beside it.

    Load it with ``timm.create_model(name, num_classes=0).load_state_dict(torch.load(path))``, or with
    :func:`magma_composer.evaluate.encoders.load_encoder`, which rebuilds the encoder from ``<path>.json``: the
    encoder's architecture (a ViT's sizes, :func:`~magma_composer.models.mae.encoder_architecture`, whose ``num_heads``
    no tensor shape shows; a CNN's timm name and stem) and the file's sha256, so a sidecar left beside another
    file is recognised. Tensors are moved to the CPU first, so the file loads on a machine without the training
    accelerator. An ``s3://`` path is written locally first and uploaded with its hash file and sidecar.

    Args:
        model (torch.nn.Module): a :class:`~magma_composer.models.ComposerMAE`, ``ComposerSimCLR`` or
            ``ComposerVICReg`` (or a wrapper with ``.module``); another model whose ``encoder`` is a timm ViT.
        path (str): the output file (check it first with :func:`check_output_file`).

    Returns:
        str: the sha256 of the file written.
    """
    from magma_composer.models.mae import encoder_architecture

    net = getattr(model, "module", model)
    state = {name: tensor.detach().cpu() for name, tensor in net.encoder.state_dict().items()}
    # the models of this package record their encoder (a ViT's sizes, a CNN's timm name) in their extra state
    extra = net.get_extra_state() if hasattr(net, "get_extra_state") else None
    architecture = extra.get("encoder") if isinstance(extra, dict) else None
    if architecture is None:
        architecture = encoder_architecture(net.encoder)

    def sidecar(digest: str) -> bytes:
        record = {"format": ENCODER_SIDECAR_FORMAT, "sha256": digest, "architecture": architecture}
        return (json.dumps(record, indent=2) + "\n").encode()

    if not is_remote(path):
        # a sidecar of the file being replaced goes first: a crash then leaves no record that describes another file
        Path(path + ENCODER_SIDECAR_SUFFIX).unlink(missing_ok=True)
        digest = write_with_hash(path, lambda f: torch.save(state, f))
        write_atomic(path + ENCODER_SIDECAR_SUFFIX, lambda f: f.write(sidecar(digest)))
        return digest
    from magma_composer.data.storage import upload_file, write_bytes

    with tempfile.TemporaryDirectory(prefix="magma-export-") as tmp:
        local = Path(tmp) / Path(path).name
        digest = write_atomic(local, lambda f: torch.save(state, f))
        upload_file(str(local), path)
        write_bytes(path + HASH_SUFFIX, f"{digest}  {local.name}\n".encode())
        write_bytes(path + ENCODER_SIDECAR_SUFFIX, sidecar(digest))
    return digest


# ---------------------------------------------------------------------------------------------------- verifying
def _read_hash_file(hash_path: Path, path: str) -> str:
    text = hash_path.read_text(errors="replace").strip()
    digest = text.split()[0].lower() if text else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise CheckpointError(
            f"{path}: its hash file {hash_path} does not hold a sha256 (found {text[:80]!r}); "
            "remove the hash file to check the checkpoint by its structure only"
        )
    return digest


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded in ``<file>.sha256`` beside a local file (a symbolic link's target), or ``None``.

    Raises:
        CheckpointError: the hash file exists but holds no sha256.
    """
    real = Path(os.path.realpath(path))
    hash_path = Path(str(real) + HASH_SUFFIX)
    return _read_hash_file(hash_path, str(path)) if hash_path.is_file() else None


def _check_structure(real: Path, path: str) -> None:
    """A checkpoint without a hash file: reads its archive structure and per-member CRCs, streaming, without
    unpickling (torch's zip format or a Composer tarball; compressed streams and torch's legacy format are not
    checked)."""
    if is_compressed_pt(real.name):
        return  # a compressed stream (``.pt.lz4``, ...): only its hash file can vouch for it
    try:
        if is_tar(real.name):
            with tarfile.open(real) as tar:
                for member in tar:
                    if member.isfile():
                        with tar.extractfile(member) as f:  # type: ignore[union-attr]
                            while f.read(_CHUNK):
                                pass
            return
        with open(real, "rb") as f:
            head = f.read(4)
        if head[:1] == b"\x80":
            return  # torch's legacy (pre-zip) format: a pickle stream with no structure to check cheaply
        with zipfile.ZipFile(real) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({real.stat().st_size} bytes; {exc}): it is truncated or not a "
            "checkpoint file (torch would say 'failed finding central directory'); use another checkpoint"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{path} is altered: the CRC of its member {bad!r} does not match its content; use another checkpoint"
        )


def verify_checkpoint(path: str) -> None:
    """Refuses a local checkpoint that is missing, truncated or altered, before Composer loads it.

    With ``<checkpoint>.sha256`` beside the file (written by :class:`CheckpointHashes` or
    :func:`write_with_hash`), the file's sha256 must match it. Without one, the file must be a complete archive
    whose members match their CRCs. Both read the file once, in chunks, without loading it. A symbolic link
    (``latest-rank0.pt``) is followed; the hash file lies beside its target. A folder (a sharded checkpoint) is
    checked file by file where hash files exist. Remote URIs are not checked here.

    Args:
        path (str): the checkpoint file (``load_path``, or the one autoresume picks: see :func:`latest_checkpoint`).

    Raises:
        CheckpointError: the file does not exist, or it is truncated or altered; the message names ``path``.
    """
    if is_remote(path):
        return
    real = Path(os.path.realpath(path))
    shown = path if str(real) == os.path.abspath(path) else f"{path} (-> {real})"
    if not real.exists():
        raise CheckpointError(f"checkpoint {shown} does not exist")
    if real.is_dir():
        for item in sorted(real.rglob("*" + HASH_SUFFIX)):
            verify_checkpoint(str(item)[: -len(HASH_SUFFIX)])
        return
    hash_path = Path(str(real) + HASH_SUFFIX)
    if not hash_path.is_file():
        _check_structure(real, shown)
        return
    expected = _read_hash_file(hash_path, shown)
    actual = file_sha256(real)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {shown} is truncated or altered: its sha256 {actual[:16]}... differs from the one written "
            f"with it ({expected[:16]}... in {hash_path}; the file now has {real.stat().st_size} bytes); "
            "use another checkpoint"
        )


def latest_checkpoint(save_folder: str) -> str | None:
    """The checkpoint autoresume will load from a local ``save_folder`` (its ``latest-rank0.pt``), or ``None``."""
    latest = os.path.join(save_folder, LATEST_CHECKPOINT)
    return latest if os.path.lexists(latest) else None


# ---------------------------------------------------------------------------------------------------- run record
def resolve_run_name(run_name: str | None) -> str:
    """The run's name, fixed before the Trainer is built so that ``{run_name}`` in paths can be filled in.

    As Composer does: the given name, else ``COMPOSER_RUN_NAME``, else ``RUN_NAME``, else a new unique name
    (UTC time and random hex, e.g. ``20250101-120000-3fa9c2``). With several ranks the new name is rank 0's; call
    this after ``composer.utils.dist.initialize_dist`` then.
    """
    name = run_name or os.environ.get("COMPOSER_RUN_NAME") or os.environ.get("RUN_NAME")
    if name:
        return name
    names = [f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"]
    if dist.get_world_size() > 1:
        if not dist.is_initialized():
            raise RuntimeError("resolve_run_name with several ranks needs composer.utils.dist.initialize_dist first")
        dist.broadcast_object_list(names, src=0)
    return names[0]


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{parameter name: shape}`` of ``model`` (unwrapped from ``.module``), in registration order."""
    net = getattr(model, "module", model)
    return {name: list(p.shape) for name, p in net.named_parameters()}


@dataclass
class RunRecord:
    """What a run writes into its save folder (``run.json``), so a later run can tell whose checkpoints are there.

    Args:
        run_name (str): the run's name.
        model_class (str): the model's class (``module.QualName``).
        parameter_shapes (dict[str, list[int]]): every parameter's shape, by name.
        created (str): when the record was written (ISO 8601, UTC).
        magma_composer_version (str): the package version that wrote it.
    """

    run_name: str
    model_class: str
    parameter_shapes: dict[str, list[int]] = field(default_factory=dict)
    created: str = ""
    magma_composer_version: str = __version__

    @classmethod
    def for_model(cls, run_name: str, model: torch.nn.Module) -> RunRecord:
        """The record of a run of ``model`` starting now."""
        net = getattr(model, "module", model)
        return cls(
            run_name=run_name,
            model_class=f"{type(net).__module__}.{type(net).__qualname__}",
            parameter_shapes=parameter_shapes(net),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    @classmethod
    def read(cls, save_folder: str) -> RunRecord | None:
        """The record in ``save_folder``, or ``None`` when it has none.

        Raises:
            CheckpointError: ``run.json`` exists but is not a run record.
        """
        path = Path(save_folder) / RUN_RECORD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(
                run_name=str(data["run_name"]),
                model_class=str(data.get("model_class", "")),
                parameter_shapes={str(k): [int(d) for d in v] for k, v in dict(data["parameter_shapes"]).items()},
                created=str(data.get("created", "")),
                magma_composer_version=str(data.get("magma_composer_version", "")),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{path} is not a run record ({type(exc).__name__}: {exc}); it needs run_name and parameter_shapes. "
                "Restore it, or choose another save_folder"
            ) from None

    def write(self, save_folder: str) -> None:
        """Writes ``run.json`` into ``save_folder`` (atomically)."""
        text = json.dumps(asdict(self), indent=1) + "\n"
        write_atomic(Path(save_folder) / RUN_RECORD, lambda f: f.write(text.encode()))


def _first_shape_difference(recorded: dict[str, list[int]], current: dict[str, list[int]]) -> str | None:
    for name, shape in current.items():
        if name not in recorded:
            return f"this model has a parameter {name} {shape} that the run's model did not have"
        if recorded[name] != shape:
            return f"parameter {name} has shape {recorded[name]} in the run's model but {shape} in this one"
    for name, shape in recorded.items():
        if name not in current:
            return f"the run's model has a parameter {name} {shape} that this model does not have"
    return None


def _contents(folder: Path) -> list[str]:
    """Entries of ``folder`` other than the run record, hash files and write probes."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name != RUN_RECORD and not p.name.endswith(HASH_SUFFIX) and not p.name.startswith(_PROBE_PREFIX)
    )


def _guard(folder: str, run_name: str, autoresume: bool, save_overwrite: bool, model: torch.nn.Module) -> None:
    check_output_folder(folder, "save_folder")
    record = RunRecord.read(folder)
    entries = _contents(Path(folder))
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} in all)" if len(entries) > 5 else "")
    if record is None and entries:
        raise CheckpointError(
            f"save_folder {folder} already holds {shown} but no {RUN_RECORD}: it was not written by a magma_composer "
            "run, and a run writes only into an empty folder or its own. Choose another save_folder (e.g. "
            "runs/{run_name}/checkpoints), or give one of those checkpoints as load_path"
        )
    # a run that stopped before its first checkpoint left only its record: nothing of it is lost by taking over
    if record is not None and record.run_name != run_name and entries:
        raise CheckpointError(
            f"save_folder {folder} belongs to run {record.run_name!r} ({RUN_RECORD}, created {record.created}), not "
            f"to this run {run_name!r}: a run never writes into or resumes from another run's folder. Pick another "
            f"save_folder, or the same run_name ({record.run_name}) to continue that run"
        )
    if record is not None and entries:
        if not autoresume and not save_overwrite:
            raise CheckpointError(
                f"save_folder {folder} already holds checkpoints of run {run_name!r} ({shown}): set autoresume: true "
                "to continue this run, or choose another run_name/save_folder (save_overwrite: true replaces them)"
            )
        if autoresume:
            difference = _first_shape_difference(record.parameter_shapes, parameter_shapes(model))
            if difference is not None:
                raise CheckpointError(
                    f"autoresume: the checkpoints in {folder} (run {run_name!r}) do not fit this model: {difference}. "
                    "Resume with the run's model options, or start a new run (another run_name/save_folder)"
                )
            latest = latest_checkpoint(folder)
            if latest is not None:
                verify_checkpoint(latest)
            return  # the run continues: its record stays as it was written
    if dist.get_global_rank() == 0:
        RunRecord.for_model(run_name, model).write(folder)


def guard_run(save_folder: str | None, run_name: str, autoresume: bool, save_overwrite: bool, model: Any) -> None:
    """Checks a run's ``save_folder`` before the Trainer is built, then writes the run's ``run.json`` into it.

    Refused, with the reason:

    * the folder cannot be written (:func:`check_output_folder`);
    * it holds another run's ``run.json`` (a different ``run_name``) and that run's checkpoints: always, whatever
      ``save_overwrite`` says (a record alone, left by a run that stopped before its first checkpoint, is replaced);
    * it holds files but no ``run.json`` (written by something else);
    * it holds this run's checkpoints, but neither ``autoresume`` nor ``save_overwrite`` is set;
    * ``autoresume`` would continue this run with a model whose parameter shapes differ from ``run.json``
      (the first differing parameter and both shapes are named), or from a checkpoint that
      :func:`verify_checkpoint` refuses.

    Otherwise global rank 0 writes ``run.json`` (kept as it is when the run resumes). With several ranks and
    ``torch.distributed`` initialised, rank 0 decides and every rank raises the same error. Remote save folders
    are not checked.

    Args:
        save_folder (str | None): the run's checkpoint folder; ``{run_name}`` and the rank placeholders are
            filled in as Composer does (an already formatted path is taken as it is). ``None``: nothing to check.
        run_name (str): the run's name (see :func:`resolve_run_name`).
        autoresume (bool): whether the run continues from the folder's latest checkpoint.
        save_overwrite (bool): whether the run may replace its own earlier checkpoints.
        model (torch.nn.Module): the model the run trains (its parameter shapes go into ``run.json``).

    Raises:
        CheckpointError: the folder is refused; the message names it, what was found, and what to do.
    """
    if save_folder is None or is_remote(save_folder):
        return
    folder = format_name_with_dist(save_folder, run_name)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        _guard(folder, run_name, autoresume, save_overwrite, model)
        return
    outcome: list[str | None] = [None]
    if dist.get_global_rank() == 0:
        try:
            _guard(folder, run_name, autoresume, save_overwrite, model)
        except CheckpointError as exc:
            outcome = [str(exc)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])


# ---------------------------------------------------------------------------------------------------- hashing
class CheckpointHashes(Callback):
    """Writes ``<checkpoint>.sha256`` beside every checkpoint the trainer's ``CheckpointSaver`` writes.

    The saver is the last callback and writes at the ``*_CHECKPOINT`` events, after this callback has run for
    the same event; so after every event this callback looks for checkpoints that the saver listed
    (``saved_checkpoints``) and that have no hash yet, whatever the order. The last one is hashed at ``FIT_END``
    at the latest (or at ``close`` after a failed fit). Each rank hashes the files it wrote (rank 0 only, for
    monolithic checkpoints); hash files of checkpoints the saver rotated away are removed. Hashes stay local: a
    remote save folder gets no hash file.

    Example:
        .. code-block:: python

            trainer = Trainer(..., save_folder=folder, callbacks=[CheckpointHashes()])
    """

    def __init__(self) -> None:
        self._hashed: dict[str, tuple[int, int]] = {}  # checkpoint -> (size, mtime_ns) when hashed
        self._last_seen: tuple = ()

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        super().run_event(event, state, logger)
        self._sweep(state)

    def close(self, state: State, logger: Logger) -> None:
        self._sweep(state)

    def _sweep(self, state: State) -> None:
        savers = [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)]
        seen = tuple(
            (id(s), len(s.saved_checkpoints), len(s.all_saved_checkpoints_to_timestamp), str(s.last_checkpoint_batch))
            for s in savers
        )
        if seen == self._last_seen:
            return  # nothing saved or rotated since the last look
        self._last_seen = seen
        listed = {str(path) for saver in savers for path in saver.saved_checkpoints if path}
        for path in sorted(listed):
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._hashed.get(path) != signature:
                _write_hash_file(Path(path), file_sha256(path))
                self._hashed[path] = signature
        for path in [p for p in self._hashed if p not in listed and not os.path.exists(p)]:
            Path(path + HASH_SUFFIX).unlink(missing_ok=True)  # the saver rotated this checkpoint away
            del self._hashed[path]
