"""Object storage for MDS data sets: S3 clients from the environment and a clear check of a remote data set.

Remote data sets live at ``s3://bucket/prefix`` on AWS S3 or on any S3-compatible store (MinIO, Ceph, R2, ...):
set ``S3_ENDPOINT_URL`` to the store's URL and the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
(or ``AWS_PROFILE``). ``mosaicml-streaming`` reads them the same way.

:func:`check_remote` reads a data set's ``index.json`` before training starts and turns every failure (server
down, wrong credentials, missing bucket or prefix, unreadable index) into a :class:`RemoteDataError` that names
the endpoint, the bucket and the prefix: streaming's own errors at that point are retried for minutes or come
out of a background thread as ``Background thread failed. Check other traceback.``
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

__all__ = [
    "ENDPOINT_ENV",
    "RemoteDataError",
    "check_remote",
    "describe_endpoint",
    "explain_s3_error",
    "is_remote",
    "is_timeout",
    "join_url",
    "list_names",
    "read_json",
    "remove",
    "s3_client",
    "split_s3_url",
    "upload_file",
    "write_bytes",
]

#: The environment variable that points boto3 (and streaming) at an S3-compatible store.
ENDPOINT_ENV = "S3_ENDPOINT_URL"

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class RemoteDataError(RuntimeError):
    """A data set in object storage (or a local folder) cannot be read; the message says where and why."""


def is_remote(path: str | None) -> bool:
    """Whether ``path`` is a URI (``s3://...``, ``gs://...``) rather than a local path."""
    return path is not None and urllib.parse.urlparse(str(path)).scheme not in ("", "file")


def join_url(base: str, *parts: str) -> str:
    """Joins path parts onto a local path or a URI with ``/``."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def split_s3_url(url: str) -> tuple[str, str]:
    """Splits ``s3://bucket/some/prefix`` into ``('bucket', 'some/prefix')``.

    Raises:
        ValueError: ``url`` is not an ``s3://`` URL with a bucket.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected an s3://bucket/prefix URL, got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def describe_endpoint() -> str:
    """The S3 endpoint in use, for error messages: ``S3_ENDPOINT_URL`` or AWS's default."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    return f"{endpoint} ({ENDPOINT_ENV})" if endpoint else f"AWS S3 (default endpoint; {ENDPOINT_ENV} is not set)"


def s3_client(connect_timeout: float = 10.0, read_timeout: float = 60.0, max_attempts: int = 5) -> Any:
    """A boto3 S3 client for the endpoint in ``S3_ENDPOINT_URL`` (AWS when unset), with bounded retries.

    Args:
        connect_timeout (float): seconds to wait for a connection.
        read_timeout (float): seconds to wait for a response.
        max_attempts (int): total attempts per request (botocore's ``standard`` retry mode).
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": max_attempts},  # botocore's max_attempts counts retries
    )
    return boto3.session.Session().client("s3", endpoint_url=os.environ.get(ENDPOINT_ENV) or None, config=config)


def is_timeout(error: BaseException | None) -> bool:
    """Whether ``error`` is an S3 request that timed out (connecting or waiting for the answer)."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    return isinstance(error, (ConnectTimeoutError, ReadTimeoutError)) or "timeout" in type(error).__name__.lower()


def _limits(client: Any) -> str:
    """``'within 2 s (connect) / 2 s (answer), 3 attempts'`` from a botocore client's configuration."""
    config = client.meta.config
    attempts = (config.retries or {}).get("total_max_attempts")
    text = f"within {config.connect_timeout:g} s (connect) / {config.read_timeout:g} s (answer) per attempt"
    return f"{text}, {attempts} attempts" if attempts else text


def explain_s3_error(error: BaseException, url: str, action: str, client: Any = None) -> str:
    """One sentence on why an S3 request for ``url`` failed, naming the endpoint, bucket and key.

    Args:
        error: the exception boto3 raised.
        url: the ``s3://`` URL of the request.
        action: what was tried (``'read'``, ``'upload x to'``), for the sentence.
        client: the client that made the request; a timeout message then states its limits.
    """
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    bucket, key = split_s3_url(url)
    where = f"{url} (bucket {bucket!r}, key {key!r}) at {describe_endpoint()}"
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return (
            f"cannot {action} {where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"(or AWS_PROFILE)"
        )
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        message = error.response.get("Error", {}).get("Message", "")
        if code == "NoSuchBucket":
            return f"cannot {action} {where}: bucket {bucket!r} does not exist at {describe_endpoint()}"
        if code in _AUTH_CODES:
            return (
                f"cannot {action} {where}: the server rejected the credentials ({code}: {message}); check "
                f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions"
            )
        if code in _MISSING_KEY_CODES:
            return f"cannot {action} {where}: no such object"
        return f"cannot {action} {where}: {code}: {message}"
    if is_timeout(error):
        limit = _limits(client) if client is not None else "in time (streaming's download_timeout sets the limit)"
        return (
            f"cannot {action} {where}: the S3 endpoint did not answer {limit} ({type(error).__name__}: {error}); "
            f"is the server hung or overloaded?"
        )
    if isinstance(error, EndpointConnectionError) or "connect" in type(error).__name__.lower():
        return (
            f"cannot {action} {where}: cannot connect to the S3 endpoint ({type(error).__name__}: {error}); is the "
            f"server running and is {ENDPOINT_ENV} right?"
        )
    return f"cannot {action} {where}: {type(error).__name__}: {error}"


def _check_scheme(url: str) -> None:
    if is_remote(url) and urllib.parse.urlparse(url).scheme != "s3":
        raise ValueError(f"{url!r}: only local folders and s3:// URLs are supported here")


def read_json(url: str, client: Any = None) -> Any | None:
    """Reads a JSON file from a local path or ``s3://`` URL; ``None`` when it does not exist.

    Raises:
        RemoteDataError: any S3 failure other than a missing object, naming the endpoint.
    """
    _check_scheme(url)
    if not is_remote(url):
        path = Path(url)
        return json.loads(path.read_text()) if path.is_file() else None
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    client = client or s3_client()
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code", "")) in _MISSING_KEY_CODES:
            return None
        raise RemoteDataError(explain_s3_error(error, url, "read", client)) from error
    except BotoCoreError as error:
        raise RemoteDataError(explain_s3_error(error, url, "read", client)) from error
    return json.loads(body)


def write_bytes(url: str, data: bytes, client: Any = None) -> None:
    """Writes ``data`` to a local path (atomically, through a temporary file) or an ``s3://`` URL."""
    _check_scheme(url)
    if not is_remote(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves nothing half-written behind
            raise
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    client = client or s3_client()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data)
    except (BotoCoreError, ClientError) as error:
        raise RemoteDataError(explain_s3_error(error, url, "write", client)) from error


def remove(url: str, client: Any = None) -> None:
    """Deletes a local file or folder, or the ``s3://`` object ``url`` and every object under ``url/``.

    Nothing there is not an error.

    Raises:
        RemoteDataError: an S3 request fails, naming the endpoint.
    """
    _check_scheme(url)
    if not is_remote(url):
        if os.path.isdir(url) and not os.path.islink(url):
            shutil.rmtree(url)
        elif os.path.lexists(url):
            os.unlink(url)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    client = client or s3_client()
    try:
        keys = [key]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key.rstrip('/')}/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    except (BotoCoreError, ClientError) as error:
        raise RemoteDataError(explain_s3_error(error, url, "delete", client)) from error


def upload_file(local: str, url: str, client: Any = None) -> None:
    """Uploads the local file ``local`` to the ``s3://`` URL ``url`` (multipart for large files)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    client = client or s3_client()
    try:
        client.upload_file(local, bucket, key)
    except (BotoCoreError, ClientError) as error:
        raise RemoteDataError(explain_s3_error(error, url, f"upload {local} to", client)) from error
    except Exception as error:  # boto3's transfer manager wraps failures in S3UploadFailedError
        cause = error.__cause__ or error
        raise RemoteDataError(explain_s3_error(cause, url, f"upload {local} to", client)) from error


def list_names(url: str, client: Any = None) -> list[str]:
    """Names directly under a local folder or ``s3://`` prefix (sub-folders without a trailing ``/``).

    A missing folder or prefix gives ``[]``.

    Raises:
        RemoteDataError: the bucket is missing or the server cannot be reached or refuses the credentials.
    """
    _check_scheme(url)
    if not is_remote(url):
        path = Path(url)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_url(url)
    client = client or s3_client()
    prefix = f"{prefix}/" if prefix else ""
    names: set[str] = set()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
    except (BotoCoreError, ClientError) as error:
        raise RemoteDataError(explain_s3_error(error, url, "list", client)) from error
    return sorted(names)


def _list_children(client: Any, bucket: str, prefix: str, limit: int = 10) -> list[str]:
    """Up to ``limit`` entries (objects and sub-folders) directly under ``prefix`` in ``bucket``."""
    prefix = f"{prefix}/" if prefix else ""
    response = client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=limit)
    names = [p["Prefix"][len(prefix) :] for p in response.get("CommonPrefixes", [])]
    names += [o["Key"][len(prefix) :] for o in response.get("Contents", [])]
    return sorted(names)[:limit]


def _nearest_listing(client: Any, bucket: str, prefix: str) -> str:
    """What the nearest non-empty parent of ``prefix`` holds, to help fix a wrong prefix or split."""
    from botocore.exceptions import BotoCoreError, ClientError

    empty = []
    while True:
        try:
            children = _list_children(client, bucket, prefix)
        except (BotoCoreError, ClientError):
            return f"s3://{bucket}/{prefix} cannot be listed"
        if children:
            note = f"; {', '.join(empty)} hold nothing" if empty else ""
            return f"s3://{bucket}/{prefix} holds {children}{note}: check the prefix and split"
        empty.append(f"s3://{bucket}/{prefix}")
        if not prefix:
            return f"bucket {bucket!r} is empty"
        prefix = posixpath.dirname(prefix)


def _summarize_index(index: Any, where: str) -> dict[str, Any]:
    if not isinstance(index, dict) or index.get("version") != 2 or not isinstance(index.get("shards"), list):
        raise RemoteDataError(f"{where} is not an MDS index (expected version 2 with a 'shards' list)")
    shards = index["shards"]
    hashes = sorted(set.intersection(*(set(s.get("hashes") or []) for s in shards))) if shards else []
    return {
        "shards": len(shards),
        "samples": sum(int(s.get("samples", 0)) for s in shards),
        "columns": dict(zip(shards[0].get("column_names", []), shards[0].get("column_encodings", [])))
        if shards
        else {},
        "hashes": hashes,
        "compression": shards[0].get("compression") if shards else None,
    }


def check_remote(remote: str | None, split: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Checks that an MDS data set can be read, before streaming starts, and summarises it.

    Reads ``<remote>/<split>/index.json`` (with boto3 for ``s3://``, from disk for a local folder) within a few
    bounded attempts. Other URI schemes (``gs://``, ``oci://``, ...) are not checked and give ``{}``.

    Args:
        remote (str, optional): ``s3://bucket/prefix`` or a local folder holding ``index.json``; ``None`` gives ``{}``.
        split (str, optional): sub-folder of ``remote``, as :class:`streaming.StreamingDataset` takes it.
        timeout (float): seconds for connecting and for reading, per attempt (3 attempts).

    Returns:
        dict: ``shards``, ``samples``, ``columns`` (name -> encoding), ``hashes`` (algorithms every shard
        carries: pass one as ``validate_hash``) and ``compression``.

    Raises:
        RemoteDataError: the server is unreachable, the credentials are rejected, the bucket or the prefix's
            ``index.json`` is missing (the message lists what the prefix does hold), or the index is not MDS.
    """
    if remote is None:
        return {}
    base = join_url(remote, split) if split else remote
    if not is_remote(remote):
        path = Path(base) / "index.json"
        if not path.is_file():
            listing = sorted(p.name for p in Path(base).iterdir())[:10] if Path(base).is_dir() else None
            hint = f"the folder holds {listing}" if listing is not None else "the folder does not exist"
            raise RemoteDataError(f"no MDS data set at {base}: {path} is missing ({hint})")
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise RemoteDataError(f"cannot read {path}: {error}") from error
        return _summarize_index(index, str(path))
    if urllib.parse.urlparse(remote).scheme != "s3":
        return {}

    from botocore.exceptions import BotoCoreError, ClientError

    url = join_url(base, "index.json")
    bucket, key = split_s3_url(url)
    client = s3_client(connect_timeout=timeout, read_timeout=timeout, max_attempts=3)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError) as error:
        message = explain_s3_error(error, url, "read the MDS index", client)
        code = str((getattr(error, "response", None) or {}).get("Error", {}).get("Code", ""))  # timeouts: None
        if code in _MISSING_KEY_CODES:
            message += f"; no MDS data set there ({_nearest_listing(client, bucket, posixpath.dirname(key))})"
        raise RemoteDataError(message) from error
    try:
        index = json.loads(body)
    except ValueError as error:
        raise RemoteDataError(f"{url} at {describe_endpoint()} is not valid JSON: {error}") from error
    return _summarize_index(index, f"{url} at {describe_endpoint()}")
