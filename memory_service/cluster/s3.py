"""`ObjectStore`: cluster mode's durable tier, one bucket of any S3-compatible object store, through boto3.

Owns: the boto3 client (path-style addressing, bounded timeouts and retries), the bucket's existence, and the
translation of S3 / transport failures into memory_service.errors. Promises:
- `put` writes one object whose bytes are the concatenation of the caller's parts, whole or not at all (S3
  replaces an object atomically; above MULTIPART_THRESHOLD a multipart upload, visible only once completed).
  The parts are streamed from the caller's buffers: they are never joined into one Python bytes.
- `read_into` fills the caller's buffer from a ranged GET without an intermediate copy of the whole range.
- a missing key is NotFound; an unreachable store (refused, timed out, 5xx after retries) is Unavailable naming
  the endpoint; a refused credential or a missing bucket is FailedPrecondition; a bad key or range is
  InvalidArgument.
- credentials come only from the usual AWS chain (environment, config files); none found -> unsigned requests
  (a store without auth, such as a local SeaweedFS, accepts them), said once in the log. Never logged.
- thread-safe: one boto3 client, which is.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore
import numpy as np
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from memory_service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 << 20  # bytes; above this an object goes up in parts of MULTIPART_PART bytes
MULTIPART_PART = 64 << 20  # S3 wants parts >= 5 MiB (but the last) and <= 10,000 of them: 640 GB objects
MULTIPART_THREADS = 4  # parts of one object uploaded at once
_DELETE_BATCH = 1000  # S3's limit for one DeleteObjects call
_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_unsigned_warned: set[str] = set()
_unsigned_lock = threading.Lock()

Part = bytes | bytearray | memoryview | np.ndarray


def _as_bytes_view(part: Part, i: int) -> memoryview:
    """A flat byte view of one part, without a copy; non-contiguous input is refused rather than copied."""
    if isinstance(part, np.ndarray):
        if not part.flags.c_contiguous:
            raise InvalidArgument(f"part {i} is a non-contiguous array {part.shape}; expected C-contiguous")
        return part.reshape(-1).view(np.uint8).data  # view(uint8): any dtype, bfloat16 included
    if isinstance(part, (bytes, bytearray, memoryview)):
        view = memoryview(part)
        if not view.c_contiguous:
            raise InvalidArgument(f"part {i} is a non-contiguous memoryview; expected C-contiguous")
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    raise InvalidArgument(f"part {i} is a {type(part).__name__}; expected bytes, memoryview or a numpy array")


class _PartsReader(io.RawIOBase):
    """A read-only, seekable file over bytes [start, start+length) of the concatenation of `views`.

    Seekable because botocore reads a body more than once (payload hash, retries) and rewinds it."""

    def __init__(self, views: Sequence[memoryview], start: int = 0, length: int | None = None) -> None:
        super().__init__()
        self._views = [v for v in views if v.nbytes]
        self._offsets = np.cumsum([0] + [v.nbytes for v in self._views]).tolist()  # where each view begins
        self._start = start
        self._length = self._offsets[-1] - start if length is None else length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        want = min(out.nbytes, self._length - self._pos)
        done = 0
        while done < want:
            at = self._start + self._pos + done
            i = int(np.searchsorted(self._offsets, at, side="right")) - 1
            local = at - self._offsets[i]
            n = min(want - done, self._views[i].nbytes - local)
            out[done : done + n] = self._views[i][local : local + n]
            done += n
        self._pos += done
        return done


class ObjectStore:
    """One bucket at one S3 endpoint; see the module doc for what each method promises."""

    def __init__(
        self, endpoint: str, bucket: str, *, create_bucket: bool = True, timeout_s: float = 10.0, retries: int = 3
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise InvalidArgument(f"S3 endpoint {endpoint!r} is not a URL; expected http://HOST:PORT or https://...")
        if not bucket or timeout_s <= 0 or retries < 0:
            raise InvalidArgument(
                f"bucket {bucket!r}, timeout_s {timeout_s}, retries {retries}: "
                "expected a bucket name, timeout_s > 0 and retries >= 0"
            )
        self.endpoint = endpoint
        self.bucket = bucket
        session = boto3.session.Session()
        signed = session.get_credentials() is not None
        if not signed:
            with _unsigned_lock:
                if endpoint not in _unsigned_warned:
                    _unsigned_warned.add(endpoint)
                    log.warning("no AWS credentials found (env, config files): unsigned requests to S3 at %s", endpoint)
        config = Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"total_max_attempts": retries + 1, "mode": "standard"},
            s3={"addressing_style": "path"},
            max_pool_connections=32,  # several threads share the client
            # SigV4 over http already hashes the payload and TLS guards https: no extra CRC pass per object
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            **({} if signed else {"signature_version": botocore.UNSIGNED}),
        )
        self._region = session.region_name or "us-east-1"
        self._client = session.client("s3", endpoint_url=endpoint, region_name=self._region, config=config)
        self._ensure_bucket(create_bucket)

    # -- errors -------------------------------------------------------------------------------------------------
    def _fail(self, e: Exception, what: str, key: str | None = None) -> Exception:
        """The memory_service error for a boto3 failure of `what` (an operation, for the message)."""
        where = f"S3 at {self.endpoint}"
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if key is not None and (code in _MISSING_KEY_CODES or status == 404) and code != "NoSuchBucket":
                return NotFound(f"object {key!r} is not in bucket {self.bucket!r} at {self.endpoint}")
            if code == "NoSuchBucket":
                return FailedPrecondition(f"{where}: bucket {self.bucket!r} does not exist ({what})")
            if code in _CREDENTIAL_CODES or status == 403:
                return FailedPrecondition(
                    f"{where} refused {what} on bucket {self.bucket!r}: {code}; set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or an AWS profile) to credentials this store accepts"
                )
            if status >= 500 or code in {"SlowDown", "ServiceUnavailable", "InternalError"}:
                return Unavailable(f"{where} failed {what} after retries: {code} (HTTP {status}); is it healthy?")
            return InvalidArgument(f"{where} rejected {what}: {code} (HTTP {status}): {e}")
        return Unavailable(
            f"{where} cannot be reached for {what}: {e}; check that the store runs and the endpoint is right"
        )

    def _call(self, what: str, fn, *, key: str | None = None, **kwargs):
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._fail(e, what, key) from e

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not key or len(key.encode()) > 1024:
            raise InvalidArgument(f"object key {key!r} is not valid; expected a non-empty str of <= 1024 bytes")

    def _ensure_bucket(self, create: bool) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status != 404:
                raise self._fail(e, "head_bucket") from e
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._fail(e, "head_bucket") from e
        if not create:
            raise FailedPrecondition(
                f"bucket {self.bucket!r} does not exist at {self.endpoint} and create_bucket is off; create it first"
            )
        where = {"LocationConstraint": self._region}  # us-east-1 is S3's default and refuses being named
        try:
            if self._region == "us-east-1":
                self._client.create_bucket(Bucket=self.bucket)
            else:
                self._client.create_bucket(Bucket=self.bucket, CreateBucketConfiguration=where)
        except ClientError as e:  # another node may have created it meanwhile: that is the state we want
            if e.response.get("Error", {}).get("Code") not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise self._fail(e, "create_bucket") from e
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._fail(e, "create_bucket") from e
        log.info("created bucket %r at %s", self.bucket, self.endpoint)

    # -- objects ------------------------------------------------------------------------------------------------
    def put(self, key: str, parts: Sequence[Part]) -> None:
        self._check_key(key)
        views = [_as_bytes_view(p, i) for i, p in enumerate(parts)]
        total = sum(v.nbytes for v in views)
        if total <= MULTIPART_THRESHOLD:
            self._call(
                "put_object", self._client.put_object, key=None, Key=key, Body=_PartsReader(views), ContentLength=total
            )
            return
        upload = self._call("create_multipart_upload", self._client.create_multipart_upload, Key=key)["UploadId"]
        try:

            def one(n: int, start: int) -> dict:
                length = min(MULTIPART_PART, total - start)
                body = _PartsReader(views, start, length)
                kw = {"Key": key, "UploadId": upload, "PartNumber": n, "Body": body, "ContentLength": length}
                return {"PartNumber": n, "ETag": self._call("upload_part", self._client.upload_part, **kw)["ETag"]}

            # a few parts in flight: one HTTP stream rarely fills the link to a remote store
            with ThreadPoolExecutor(min(MULTIPART_THREADS, -(-total // MULTIPART_PART))) as pool:
                done = list(pool.map(one, *zip(*enumerate(range(0, total, MULTIPART_PART), start=1))))
            self._call(
                "complete_multipart_upload",
                self._client.complete_multipart_upload,
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": done},
            )
        except BaseException:
            try:  # best effort: an upload left behind holds storage but is never visible as the object
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                log.debug("abort of multipart upload of %r failed", key, exc_info=True)
            raise

    def get(self, key: str) -> bytes:
        self._check_key(key)
        body = self._call("get_object", self._client.get_object, key=key, Key=key)["Body"]
        try:
            with body:
                return body.read()
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._fail(e, f"reading {key!r}") from e

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        self._check_key(key)
        dest = memoryview(out).cast("B")
        if offset < 0:
            raise InvalidArgument(f"offset {offset} into {key!r} is negative; expected >= 0")
        if dest.nbytes == 0:
            return
        end = offset + dest.nbytes
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{end - 1}")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                raise InvalidArgument(f"range [{offset}, {end}) of {key!r} starts past its end") from e
            raise self._fail(e, "get_object", key) from e
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._fail(e, "get_object", key) from e
        if r.get("ContentLength") != dest.nbytes:
            r["Body"].close()
            size = str(r.get("ContentRange", "")).rpartition("/")[2] or "?"
            raise InvalidArgument(f"range [{offset}, {end}) of {key!r} runs past its end: the object has {size} bytes")
        body = r["Body"]
        try:
            with body:
                got = 0
                while got < dest.nbytes:
                    n = body.readinto(dest[got:])
                    if not n:
                        raise Unavailable(f"S3 at {self.endpoint} ended {key!r} after {got} of {dest.nbytes} bytes")
                    got += n
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._fail(e, f"reading {key!r}") from e

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        try:
            for page in pages:
                keys.extend(o["Key"] for o in page.get("Contents", ()))
        except (ClientError, BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._fail(e, f"list_objects_v2 of prefix {prefix!r}") from e
        return sorted(keys)

    def delete(self, keys: Sequence[str]) -> None:
        for k in keys:
            self._check_key(k)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[i : i + _DELETE_BATCH]]
            r = self._call("delete_objects", self._client.delete_objects, Delete={"Objects": batch, "Quiet": True})
            if r.get("Errors"):  # a missing key is not an error in S3: these are real failures
                e = r["Errors"][0]
                raise Unavailable(
                    f"S3 at {self.endpoint} failed to delete {len(r['Errors'])} of {len(batch)} objects, first "
                    f"{e.get('Key')!r}: {e.get('Code')} {e.get('Message')}"
                )

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        self.delete(keys)
        return len(keys)

    def exists(self, key: str) -> bool:
        self._check_key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as e:
            if int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0) == 404:
                return False
            raise self._fail(e, "head_object", key) from e
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._fail(e, "head_object", key) from e

    def close(self) -> None:
        self._client.close()
