"""Locations of corpora, run directories, checkpoints and input files: a local path or an
object-storage URI (``s3://bucket/prefix``).

This is the one module that knows where bytes live. Everything that takes a corpus path also
takes ``s3://bucket/prefix``; local paths behave exactly as before (``pathlib.Path``,
vcc_dist.fileio's atomic writes, zarr's ``LocalStore`` with the Rust codec pipeline).

Run directories on object storage (vcc_dist.train.loop): Ray Train keeps the checkpoints
there through :func:`pyarrow_filesystem` (Ray's own ``s3://`` resolution ignores
``AWS_ENDPOINT_URL``); everything else is a whole-object PUT (:func:`write_bytes`). A process
works in a local directory (:func:`scratch_dir`, ``$VCC_DIST_SCRATCH``) and uploads; a
checkpoint read back is downloaded into that cache (vcc_dist.checkpoint.local_checkpoint).

Object storage is configured from the standard AWS variables, read when a location is opened:

=========================  ===================================================================
``AWS_ENDPOINT_URL``       the S3 endpoint (MinIO, Ceph, moto, ...); unset = AWS S3 itself
``AWS_ACCESS_KEY_ID``      credentials; unset = the client's default chain (profile, instance
``AWS_SECRET_ACCESS_KEY``  role, web identity), and a clear :class:`StorageError` if that finds
``AWS_SESSION_TOKEN``      nothing
``AWS_DEFAULT_REGION``     the region (``AWS_REGION`` also works); default ``us-east-1``
``VCC_DIST_S3_BACKEND``    ``obstore`` (default) or ``fsspec``: the zarr store used for s3
``VCC_DIST_S3_CONCURRENCY`` concurrent requests per read (default :data:`DEFAULT_CONCURRENCY`)
``VCC_DIST_SCRATCH``       local working copies of remote run directories and checkpoints
                           (default ``<system temporary directory>/vcc-dist``)
=========================  ===================================================================

or from an explicit :class:`S3Options` passed to the functions here (the documented option for
code that must not depend on the environment). A reader captures its options when it is
constructed and ships them to its Ray tasks, so workers need no AWS variables of their own.

The zarr store for s3 is ``zarr.storage.ObjectStore`` over obstore's ``S3Store``, chosen by
benchmarks/object_storage.py (benchmarks/results/object_storage.md): on the same corpus
(simulator ``small``, 15,000 cells), through the same CorpusReader row-run reads against an S3
server on loopback, it read 1.15x (cell-stream pattern) and 1.33x (set-stream pattern) the
cells/s of fsspec/s3fs (``FsspecStore``) for 2.2-2.4x less client CPU per cell. s3fs remains
for the small whole-object reads and writes below (manifests, JSON) and as
``VCC_DIST_S3_BACKEND=fsspec``. Concurrency is bounded twice: zarr's ``async.concurrency``
(default 10) caps the requests one array slice keeps in flight, and CorpusReader reads at most
:func:`concurrency` slices at once per process.

Writes: a single S3 PUT is atomic (a reader sees the old object or the new one, never half),
so :func:`write_bytes` is one PUT there; locally it is vcc_dist.fileio's temporary file +
rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vcc_dist.fileio import atomic_write_bytes, file_sha256, json_default

#: URI schemes served by object storage
REMOTE_SCHEMES = ("s3://",)
#: zarr stores for s3: "obstore" (zarr.storage.ObjectStore) or "fsspec" (FsspecStore over s3fs)
BACKENDS = ("obstore", "fsspec")
#: chosen by benchmarks/object_storage.py (see the module docstring)
DEFAULT_BACKEND = "obstore"
#: concurrent requests per read against object storage (zarr's ``async.concurrency`` and the
#: row runs a CorpusReader reads at once)
DEFAULT_CONCURRENCY = 16

Location = str | os.PathLike


class StorageError(ValueError):
    """A location cannot be reached: bad URI, missing credentials or endpoint, missing bucket."""


# ---------------------------------------------------------------------------------------------
# locations
# ---------------------------------------------------------------------------------------------


def is_remote(uri: Location) -> bool:
    """Whether ``uri`` names object storage (``s3://...``) rather than a local path."""
    return isinstance(uri, str) and uri.startswith(REMOTE_SCHEMES)


def location(uri: Location) -> str | Path:
    """``uri`` normalised: a remote URI as a string without a trailing slash, else a ``Path``.
    (``Path("s3://b/k")`` would collapse the ``//``, so remote URIs never become Paths.)"""
    if is_remote(uri):
        s = str(uri).rstrip("/")
        bucket = s[len("s3://"):].split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket; expected s3://<bucket>/<prefix>")
        return s
    if isinstance(uri, str) and "://" in uri:
        raise StorageError(f"{uri!r}: unsupported URI scheme; use a local path or "
                           "s3://<bucket>/<prefix>")
    return Path(uri)


def resolved(uri: Location) -> str:
    """``uri`` as an absolute location string: a remote URI as it is, a local path resolved
    (Ray Train workers run in their own working directories)."""
    loc = location(uri)
    return loc if isinstance(loc, str) else str(loc.resolve())


def join(base: Location, *parts: str) -> str | Path:
    """``base`` / ``parts``: a ``Path`` for local paths, a ``/``-joined URI for remote ones."""
    b = location(base)
    if isinstance(b, Path):
        return b.joinpath(*parts)
    return "/".join([b, *(str(p).strip("/") for p in parts)])


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    s = str(location(uri))
    bucket, _, key = s[len("s3://"):].partition("/")
    return bucket, key


def concurrency() -> int:
    """Concurrent requests per read against object storage (``VCC_DIST_S3_CONCURRENCY``)."""
    v = os.environ.get("VCC_DIST_S3_CONCURRENCY", "")
    if not v:
        return DEFAULT_CONCURRENCY
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise StorageError(f"VCC_DIST_S3_CONCURRENCY={v!r}: expected a positive integer")
    return n


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Options:
    """Endpoint, region and credentials of an S3-compatible object store. ``key_id`` None =
    the client's default credential chain (profile, instance role, web identity)."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    key_id: str | None = None
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Options:
        env = os.environ if env is None else env
        key, secret = env.get("AWS_ACCESS_KEY_ID") or None, env.get("AWS_SECRET_ACCESS_KEY") or None
        if (key is None) != (secret is None):
            missing = "AWS_SECRET_ACCESS_KEY" if secret is None else "AWS_ACCESS_KEY_ID"
            raise StorageError(f"{missing} is not set but its partner is: set both "
                               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or neither, to use "
                               "the default credential chain)")
        return cls(endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                   or None,
                   region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
                   key_id=key, secret=secret, token=env.get("AWS_SESSION_TOKEN") or None)

    def describe(self) -> str:
        return (f"endpoint {self.endpoint_url or 'AWS S3 (AWS_ENDPOINT_URL unset)'}, region "
                f"{self.region}, credentials "
                f"{'AWS_ACCESS_KEY_ID=' + self.key_id if self.key_id else 'default chain'}")


_FS_CACHE: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


def _options(options: S3Options | None) -> S3Options:
    return options if options is not None else S3Options.from_env()


def filesystem(uri: Location, options: S3Options | None = None):
    """The fsspec filesystem holding ``uri``: local, or s3fs configured from ``options``
    (default: the AWS variables). Cached per process and configuration."""
    import fsspec  # lazy: only object storage needs fsspec's registry

    if not is_remote(uri):
        location(uri)  # rejects unknown schemes
        return fsspec.filesystem("file")
    o = _options(options)
    key = ("s3", o)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            import s3fs

            fs = s3fs.S3FileSystem(**_s3fs_kwargs(o), skip_instance_cache=True)
            _FS_CACHE[key] = fs
    return fs


def _async_s3fs(o: S3Options):
    """One asynchronous s3fs per configuration and process (zarr runs one event loop)."""
    key = ("s3-async", o)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            import s3fs

            fs = s3fs.S3FileSystem(**_s3fs_kwargs(o), asynchronous=True,
                                   skip_instance_cache=True)
            _FS_CACHE[key] = fs
    return fs


def _s3fs_kwargs(o: S3Options) -> dict[str, Any]:
    kw: dict[str, Any] = {"client_kwargs": {"region_name": o.region}}
    if o.endpoint_url:
        kw["endpoint_url"] = o.endpoint_url
    if o.key_id:
        kw.update(key=o.key_id, secret=o.secret, token=o.token)
    return kw


@contextmanager
def _errors(uri: Location, options: S3Options | None) -> Iterator[None]:
    """Translate object-storage client errors into StorageError naming the fix."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        if is_remote(uri) and "bucket" in str(e).lower():  # s3fs: "bucket does not exist"
            raise _storage_error(uri, e, options) from e
        raise
    except Exception as e:  # noqa: BLE001 - botocore/obstore errors have no common base
        if not is_remote(uri):
            raise
        raise _storage_error(uri, e, options) from e


def _storage_error(uri: Location, e: BaseException, options: S3Options | None) -> StorageError:
    text = f"{type(e).__name__}: {e}"
    try:
        where = _options(options).describe()
    except StorageError as bad:
        return bad
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket" in low:
        fix = (f"bucket {split_s3(str(uri))[0]!r} does not exist there; create it, fix the "
               "URI, or set AWS_ENDPOINT_URL to the object store that holds it")
    elif ("credential" in low or "accessdenied" in low or "forbidden" in low or "403" in low
          or "signature" in low or "invalidaccesskeyid" in low):
        fix = ("the credentials were refused or not found; set AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)")
    elif "connect" in low or "endpoint" in low or "dns" in low or "timed out" in low:
        fix = "the endpoint cannot be reached; set AWS_ENDPOINT_URL to the object store's URL"
    else:
        fix = ("check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
               "AWS_DEFAULT_REGION")
    return StorageError(f"cannot access {uri} ({where}): {fix}. Cause: {text[:300]}")


# ---------------------------------------------------------------------------------------------
# bytes and JSON
# ---------------------------------------------------------------------------------------------


def read_bytes(uri: Location, options: S3Options | None = None) -> bytes:
    """The whole object/file. A missing one raises FileNotFoundError (as for local files)."""
    if not is_remote(uri):
        return Path(uri).read_bytes()
    with _errors(uri, options):
        return filesystem(uri, options).cat_file(str(location(uri)))


def read_json(uri: Location, options: S3Options | None = None) -> Any:
    return json.loads(read_bytes(uri, options))


def sha256(uri: Location, options: S3Options | None = None) -> str:
    """The SHA-256 of a file's or object's bytes, read in 1 MiB blocks."""
    if not is_remote(uri):
        return file_sha256(uri)
    h = hashlib.sha256()
    with _errors(uri, options), filesystem(uri, options).open(str(location(uri)), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(uri: Location, data: bytes, options: S3Options | None = None) -> None:
    """Atomic write: locally a temporary file renamed over the target; on S3 one PUT."""
    if not is_remote(uri):
        atomic_write_bytes(uri, data)
        return
    with _errors(uri, options):
        filesystem(uri, options).pipe_file(str(location(uri)), data)


def write_json(uri: Location, obj: Any, options: S3Options | None = None) -> None:
    write_bytes(uri, (json.dumps(obj, indent=1, default=json_default) + "\n").encode(), options)


def exists(uri: Location, options: S3Options | None = None) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    with _errors(uri, options):
        return bool(filesystem(uri, options).exists(str(location(uri))))


def listdir(uri: Location, options: S3Options | None = None) -> list[str]:
    """Names (not paths) directly under ``uri``, sorted."""
    if not is_remote(uri):
        return sorted(p.name for p in Path(uri).iterdir())
    with _errors(uri, options):
        fs = filesystem(uri, options)
        path = str(location(uri))
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1]
                          for p in fs.ls(path, detail=False, refresh=True))
        finally:
            # s3fs keeps the listing: a later exists/read in this process would then miss
            # objects other processes write under uri (a resume listing parts, then reading
            # them). Listings are never reused here, so none is kept.
            fs.invalidate_cache(path)


def upload_dir(local: Location, uri: str, options: S3Options | None = None) -> None:
    """Copy a local directory tree (e.g. a converted corpus) to ``uri``."""
    if not is_remote(uri):
        raise StorageError(f"upload_dir needs an s3:// destination, got {uri!r}")
    with _errors(uri, options):
        filesystem(uri, options).put(str(Path(local)) + "/", str(location(uri)),
                                     recursive=True)


def download_dir(uri: str, local: Location, options: S3Options | None = None) -> Path:
    """Copy the tree under ``uri`` into the local directory ``local`` (created); returns it.
    A missing prefix raises FileNotFoundError."""
    dest = Path(local)
    dest.mkdir(parents=True, exist_ok=True)
    if not is_remote(uri):
        shutil.copytree(uri, dest, dirs_exist_ok=True)
        return dest
    with _errors(uri, options):
        fs = filesystem(uri, options)
        src = str(location(uri))
        if not fs.exists(src):
            raise FileNotFoundError(f"{uri} does not exist")
        fs.get(src + "/", str(dest) + "/", recursive=True)
    return dest


def basename(uri: Location) -> str:
    """The last component of a path or URI."""
    return str(location(uri)).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: Location) -> str | Path:
    """The directory/prefix holding ``uri``."""
    loc = location(uri)
    if isinstance(loc, Path):
        return loc.parent
    return loc.rsplit("/", 1)[0]


def scratch_dir(uri: str) -> Path:
    """The local working directory of a process for the remote location ``uri`` (a run
    directory on s3): ``$VCC_DIST_SCRATCH/<bucket>/<key>``, default under the system's temporary
    directory. Durable state never lives only here; it is uploaded to ``uri``."""
    base = Path(os.environ.get("VCC_DIST_SCRATCH") or Path(tempfile.gettempdir()) / "vcc-dist")
    bucket, key = split_s3(uri)
    return base / bucket / key


def pyarrow_filesystem(uri: str, options: S3Options | None = None):
    """``(pyarrow.fs.S3FileSystem, "bucket/key")`` for ``uri``, configured like every other
    client here: what Ray Train's ``RunConfig(storage_path=..., storage_filesystem=...)`` needs
    to keep run directories and checkpoints on an S3-compatible store at a custom endpoint
    (Ray's own resolution of ``s3://`` ignores ``AWS_ENDPOINT_URL``)."""
    import pyarrow.fs  # lazy: only remote run directories need it

    o = _options(options)
    kw: dict[str, Any] = {"region": o.region}
    if o.endpoint_url:
        scheme, _, host = o.endpoint_url.partition("://")
        kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    # keys only when given explicitly: Ray pickles this filesystem with the run's config (Tune
    # writes it into the experiment, tuner.pkl, in the bucket). From the environment, the AWS
    # SDK's default chain reads the same variables in every process that unpickles it
    if options is not None and o.key_id:
        kw.update(access_key=o.key_id, secret_key=o.secret, session_token=o.token)
    bucket, key = split_s3(uri)
    return pyarrow.fs.S3FileSystem(**kw), "/".join(p for p in (bucket, key) if p)


def s3_uri(fs_path: str) -> str:
    """``bucket/key`` (a path on a pyarrow S3 filesystem) -> ``s3://bucket/key``."""
    return "s3://" + fs_path.lstrip("/")


# ---------------------------------------------------------------------------------------------
# zarr
# ---------------------------------------------------------------------------------------------


def backend() -> str:
    """The zarr store backend for s3 (``VCC_DIST_S3_BACKEND``, default DEFAULT_BACKEND)."""
    b = os.environ.get("VCC_DIST_S3_BACKEND") or DEFAULT_BACKEND
    if b not in BACKENDS:
        raise StorageError(f"VCC_DIST_S3_BACKEND={b!r}: expected one of {BACKENDS}")
    return b


def open_zarr_store(uri: Location, mode: str = "r", options: S3Options | None = None,
                    backend_name: str | None = None):
    """The zarr store to open ``uri`` with (pass it to ``zarr.open_group``/``open_array``).

    Local: the path itself as a string (zarr makes its ``LocalStore``, exactly as before).
    s3: ``ObjectStore`` over obstore's ``S3Store`` (or ``FsspecStore`` over s3fs with
    ``backend_name="fsspec"``), read-only unless ``mode`` writes."""
    if mode not in ("r", "r+", "a", "w", "w-"):
        raise ValueError(f"mode={mode!r}: expected one of r, r+, a, w, w-")
    if not is_remote(uri):
        return str(location(uri))
    import zarr.storage  # lazy: keeps this module importable without zarr's start-up cost

    o = _options(options)
    b = backend_name or backend()
    if b not in BACKENDS:
        raise StorageError(f"backend {b!r}: expected one of {BACKENDS}")
    bucket, key = split_s3(str(uri))
    read_only = mode == "r"
    if b == "fsspec":
        return zarr.storage.FsspecStore(_async_s3fs(o), read_only=read_only,
                                        path=f"{bucket}/{key}")
    from obstore.store import S3Store

    cfg: dict[str, Any] = {"region": o.region}
    if o.endpoint_url:
        cfg["endpoint"] = o.endpoint_url
    if o.key_id:
        cfg.update(access_key_id=o.key_id, secret_access_key=o.secret)
        if o.token:
            cfg["session_token"] = o.token
    http = bool(o.endpoint_url and o.endpoint_url.startswith("http://"))
    with _errors(uri, options):
        s3 = S3Store(bucket, prefix=key or None, config=cfg,
                     client_options={"allow_http": http})
    return zarr.storage.ObjectStore(s3, read_only=read_only)



# --- writes for conversion ---
# Used by data_conversion to write corpora into object storage (docs/design.md §3, "Commit
# protocol on object storage"): inputs read from s3, stores uploaded under attempt-unique
# prefixes with their root metadata last, abandoned prefixes deleted.


def bucket_exists(uri: Location, options: S3Options | None = None) -> bool:
    """Whether the bucket of ``uri`` exists (True for local paths)."""
    if not is_remote(uri):
        return True
    with _errors(uri, options):
        return bool(filesystem(uri, options).exists(split_s3(str(uri))[0]))


def file_size(uri: Location, options: S3Options | None = None) -> int:
    """Size in bytes of a file/object; a missing one raises FileNotFoundError."""
    if not is_remote(uri):
        return os.path.getsize(uri)
    with _errors(uri, options):
        return int(filesystem(uri, options).size(str(location(uri))))


def read_range(uri: Location, start: int, stop: int, options: S3Options | None = None) -> bytes:
    """Bytes ``[start, stop)`` of a file/object (one ranged GET on s3)."""
    if not is_remote(uri):
        with open(uri, "rb") as f:
            f.seek(start)
            return f.read(max(stop - start, 0))
    with _errors(uri, options):
        return filesystem(uri, options).cat_file(str(location(uri)), start=start, end=stop)


def open_read(uri: Location, options: S3Options | None = None, block_size: int = 1 << 22):
    """A read-only binary file object (seekable; h5py opens it): a local file, or an s3fs file
    reading ``block_size`` bytes per request."""
    if not is_remote(uri):
        return open(uri, "rb")
    with _errors(uri, options):
        return filesystem(uri, options).open(str(location(uri)), "rb", block_size=block_size)


def download_file(uri: Location, local: Location, options: S3Options | None = None) -> None:
    """Copy one object (or local file) to the local path ``local``."""
    if not is_remote(uri):
        filesystem(uri).cp_file(str(location(uri)), str(local))
        return
    with _errors(uri, options):
        filesystem(uri, options).get_file(str(location(uri)), str(local))


def upload_file(local: Location, uri: Location, options: S3Options | None = None) -> None:
    """Copy the local file ``local`` to ``uri`` (an object: one PUT or a multipart upload that
    S3 makes visible only when complete; or a local path, written to a temporary name and
    renamed), streamed, never held in memory whole."""
    if not is_remote(uri):
        dest = Path(location(uri))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
        return
    with _errors(uri, options):
        filesystem(uri, options).put_file(str(local), str(location(uri)))


def upload_dir_last(local: Location, uri: str, last: str,
                    options: S3Options | None = None) -> None:
    """Copy a local directory tree to ``uri``, its file ``last`` (a path relative to
    ``local``) only after every other file: a reader that needs ``last`` (e.g. a zarr store's
    root ``zarr.json``) never finds a partial tree behind it."""
    if not is_remote(uri):
        raise StorageError(f"upload_dir_last needs an s3:// destination, got {uri!r}")
    root = Path(local)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p != root / last)
    base = str(location(uri))
    with _errors(uri, options):
        fs = filesystem(uri, options)
        if files:
            fs.put([str(p) for p in files],
                   [f"{base}/{p.relative_to(root).as_posix()}" for p in files])
        fs.put_file(str(root / last), f"{base}/{last}")


def delete_tree(uri: Location, options: S3Options | None = None) -> None:
    """Delete ``uri`` and everything under it; nothing there is not an error."""
    with _errors(uri, options):
        try:
            filesystem(uri, options).rm(str(location(uri)), recursive=True)
        except FileNotFoundError:
            pass
