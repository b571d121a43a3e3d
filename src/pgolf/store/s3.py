"""`s3://` backend on boto3 (imported here, so only stores that need it pay for it).

Every put records the sha256 twice: as user metadata `x-amz-meta-sha256` (read back by head/get,
the identity we compare) and as an S3 checksum (`ChecksumSHA256` on single PUTs, so the server
rejects bytes that changed on the way; `ChecksumAlgorithm=SHA256` on multipart uploads).
Errors become one-line StoreErrors; credentials are never put in a message or a log line.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from pgolf.errors import StoreError
from pgolf.store.base import (ChecksumMismatch, ObjectNotFound, ObjInfo, PreconditionFailed,
                              S3Options, StoreUnavailable, check_sha, join_key,
                              receive_verified, sha256_bytes, validate_key)
from pgolf.fileio import sha256_fileobj

log = logging.getLogger(__name__)

CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed"}
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"}


_LOADER: Any = None


def _botocore_session() -> Any:
    """A fresh botocore session (so env credentials are read anew) sharing one model loader:
    parsing the S3 service JSON is most of the 0.4 s a new client costs."""
    import botocore.session
    from botocore.loaders import create_loader

    global _LOADER
    if _LOADER is None:
        _LOADER = create_loader()
    session = botocore.session.Session()
    session.register_component("data_loader", _LOADER)
    return session


def _b64_sha(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


class S3Store:
    """An S3 (or S3-compatible: SeaweedFS, moto, R2, MinIO) bucket + prefix."""

    def __init__(self, bucket: str, prefix: str, options: S3Options):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        for name in ("botocore", "boto3", "s3transfer"):  # their INFO lines are noise in our CLI
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self.bucket, self.prefix, self.options = bucket, prefix, options
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        botocfg = Config(
            retries={"mode": "standard", "total_max_attempts": max(1, options.max_attempts)},
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            signature_version="s3v4",  # presigned URLs too (botocore would presign with SigV2)
            s3={"addressing_style": "path"} if options.endpoint_url else None,
        )
        kwargs: dict[str, Any] = {"config": botocfg}
        if options.endpoint_url:
            kwargs["endpoint_url"] = options.endpoint_url
        if options.access_key and options.secret_key:
            kwargs["aws_access_key_id"] = options.access_key
            kwargs["aws_secret_access_key"] = options.secret_key
        session = boto3.session.Session(botocore_session=_botocore_session())
        kwargs["region_name"] = options.region or session.region_name or "us-east-1"
        self.client = session.client("s3", **kwargs)
        self.transfer = TransferConfig(
            multipart_threshold=options.multipart_threshold,
            multipart_chunksize=options.multipart_chunksize,
            max_concurrency=options.max_concurrency,
        )

    # -- helpers -------------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def _where(self, key: str | None) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None = None) -> Iterator[None]:
        """Translate boto errors into one-line StoreErrors (what, where, what to do)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore import exceptions as bex

        where = self._where(key)
        endpoint = self.client.meta.endpoint_url
        try:
            yield
        except bex.ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise self._client_error(op, where, str(err.get("Code", status)), status,
                                          str(err.get("Message", ""))) from None
        except S3UploadFailedError as exc:  # s3transfer flattens the ClientError into text
            match = re.search(r"\(([A-Za-z0-9]+)\)", str(exc))
            raise self._client_error(op, where, match.group(1) if match else "UploadFailed",
                                          None, "") from None
        except (bex.ConnectionError, bex.HTTPClientError) as exc:
            raise StoreUnavailable(f"cannot reach the S3 endpoint {endpoint} for {op} {where} "
                                        f"({type(exc).__name__}): is the store up? (make store-up, "
                                        "or check AWS_ENDPOINT_URL_S3)") from None
        except (bex.NoCredentialsError, bex.PartialCredentialsError):
            raise StoreError(f"no AWS credentials for {self.uri}: set AWS_ACCESS_KEY_ID/"
                                  "AWS_SECRET_ACCESS_KEY (local store: eval \"$(pgolf store env)\")"
                                  ) from None
        except bex.FlexibleChecksumError:
            raise ChecksumMismatch(f"checksum mismatch downloading {where}: the object is "
                                        "corrupt or changed mid-read; retry or re-upload it") from None

    def _client_error(self, op: str, where: str, code: str, status: int | None,
                      message: str) -> StoreError:
        if code in CREDENTIAL_CODES:
            return StoreError(f"S3 rejected the credentials for s3://{self.bucket} ({code}): "
                                   "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if code in ("403", "AccessDenied", "Forbidden"):
            return StoreError(f"S3 denied {op} on {where} ({code}): check AWS_ACCESS_KEY_ID/"
                                   "AWS_SECRET_ACCESS_KEY and the bucket's permissions")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return PreconditionFailed(f"conditional {op} on {where} failed ({code}): the object "
                                           "exists or changed; re-read it and retry")
        if code in ("NoSuchBucket",):
            return StoreError(f"bucket s3://{self.bucket} does not exist at "
                                   f"{self.client.meta.endpoint_url}: create it or fix the URI "
                                   "(pgolf store up creates pgolf-results)")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(f"no object {where}: check the key (pgolf results ls)")
        if code in TRANSIENT_CODES or (status or 0) >= 500:
            return StoreUnavailable(f"S3 {op} {where} failed ({code}, HTTP {status}): the "
                                         "store is overloaded or restarting; retry later")
        if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
            return ChecksumMismatch(f"S3 rejected {op} {where} ({code}): the bytes changed "
                                         "between hashing and upload; retry")
        return StoreError(f"S3 {op} {where} failed ({code}, HTTP {status}): "
                               f"{message.splitlines()[0] if message else 'no message'}")

    @staticmethod
    def _info(key: str, resp: dict[str, Any]) -> ObjInfo:
        meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
        mtime = resp.get("LastModified")
        return ObjInfo(key=key, size=int(resp.get("ContentLength", resp.get("Size", 0))),
                       sha256=meta.get("sha256"), etag=(resp.get("ETag") or "").strip('"') or None,
                       mtime=mtime.timestamp() if mtime else None, metadata=meta)

    # -- writes --------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None, metadata: dict[str, str] | None = None) -> ObjInfo:
        sha = sha256_bytes(data)
        return self._put_object(key, data, sha, len(data), if_absent, if_match, metadata)

    def _put_object(self, key: str, body: Any, sha: str, size: int, if_absent: bool,
                    if_match: str | None, metadata: dict[str, str] | None) -> ObjInfo:
        args: dict[str, Any] = dict(Bucket=self.bucket, Key=self._k(key), Body=body,
                                         Metadata={**(metadata or {}), "sha256": sha},
                                         ChecksumSHA256=_b64_sha(sha))
        if if_absent:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = f'"{if_match}"' if not if_match.startswith('"') else if_match
        with self._errors("put", key):
            resp = self.client.put_object(**args)
        return ObjInfo(key=key, size=size, sha256=sha, etag=resp.get("ETag", "").strip('"'),
                       metadata={**(metadata or {}), "sha256": sha})

    def put_file(self, key: str, path: str | Path, *, if_absent: bool = False,
                 metadata: dict[str, str] | None = None) -> ObjInfo:
        """Single PUT below the multipart threshold (server-verified SHA256), else multipart.

        The file is opened once: the sha256 recorded and the bytes sent come from the same open
        file, so a writer that replaces the path meanwhile (temp + rename) cannot make them differ.
        """
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            sha = sha256_fileobj(fh)
            fh.seek(0)
            if if_absent or size < self.options.multipart_threshold:
                return self._put_object(key, fh, sha, size, if_absent, None, metadata)
            extra = {"Metadata": {**(metadata or {}), "sha256": sha}, "ChecksumAlgorithm": "SHA256"}
            with self._errors("upload", key):
                self.client.upload_fileobj(fh, self.bucket, self._k(key), ExtraArgs=extra,
                                                Config=self.transfer)
        info = self.head(key)
        if info is None or info.size != size:
            raise StoreError(f"upload of {self._where(key)} did not stick (size "
                                  f"{None if info is None else info.size} != {size}); retry")
        return info

    # -- reads ---------------------------------------------------------------------------------

    def head(self, key: str) -> ObjInfo | None:
        from botocore.exceptions import ClientError

        try:
            with self._errors("head", key):
                try:
                    resp = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
                except ClientError as exc:
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if status == 404:
                        return None
                    if status == 403:
                        # HEAD responses have no body, so no error code: ask a GET-style call,
                        # which names the cause (InvalidAccessKeyId, SignatureDoesNotMatch, ...).
                        self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._k(key),
                                                         MaxKeys=1)
                    raise
        except ObjectNotFound:
            return None
        return self._info(key, resp)

    def _get(self, key: str) -> dict[str, Any]:
        with self._errors("get", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key),
                                               ChecksumMode="ENABLED")

    def get_bytes(self, key: str) -> bytes:
        resp = self._get(key)
        with self._errors("get", key):
            data = resp["Body"].read()
        check_sha(self.uri, key, self._info(key, resp).sha256, sha256_bytes(data))
        return data

    def get_file(self, key: str, path: str | Path) -> ObjInfo:
        """Stream into a temp file next to `path`, hash on the way, rename only if it matches."""
        resp = self._get(key)
        info = self._info(key, resp)
        with self._errors("get", key):
            receive_verified(resp["Body"], path, self.uri, key, info.sha256)
        return info

    def list(self, prefix: str = "", *, start_after: str | None = None,
             page_size: int = 1000) -> Iterator[ObjInfo]:
        """Keys under `prefix` in S3's (UTF-8 byte) order. sha256 is None: listings carry no
        user metadata; call head() when the identity is needed."""
        root = self.prefix + "/" if self.prefix else ""
        args: dict[str, Any] = dict(Bucket=self.bucket, Prefix=root + prefix, MaxKeys=page_size)
        if start_after:
            args["StartAfter"] = root + start_after
        while True:
            with self._errors("list", prefix or None):
                resp = self.client.list_objects_v2(**args)
            for obj in resp.get("Contents", []):
                key = obj["Key"][len(root):]
                yield ObjInfo(key=key, size=int(obj.get("Size", 0)),
                                   etag=(obj.get("ETag") or "").strip('"') or None,
                                   mtime=obj["LastModified"].timestamp() if obj.get("LastModified")
                                   else None)
            if not resp.get("IsTruncated"):
                return
            args["ContinuationToken"] = resp["NextContinuationToken"]
            args.pop("StartAfter", None)

    # -- the rest ------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def url(self, key: str, expires: int = 3600) -> str:
        with self._errors("presign", key):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._k(key)},
                ExpiresIn=expires)

    def create_bucket(self) -> None:
        """Create the bucket if it is missing (local stores and tests; never needed on AWS)."""
        with self._errors("create bucket"):
            if self.head_bucket():
                return
            self.client.create_bucket(Bucket=self.bucket)

    def check_bucket(self) -> None:
        """Fail in one line unless the bucket exists and these credentials may read it."""
        from botocore.exceptions import ClientError

        with self._errors("head bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    raise self._client_error("head bucket", self.uri, "NoSuchBucket", 404,
                                                  "") from None
                if status in (400, 403):  # no body on HEAD: a listing names the cause
                    self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                raise

    def head_bucket(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
