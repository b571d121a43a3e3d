"""ObjectStore contract over file://, moto and a real SeaweedFS, plus backend-specific faults."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from pgolf.errors import StoreError
from pgolf.store import (ChecksumMismatch, ObjectNotFound, PreconditionFailed, S3Options,
                         StoreUnavailable, open_store, validate_key)
from store_fixtures import (TEST_BUCKET, backend, s3_options, seaweed_server, store,  # noqa: F401
                            store_uri)

UNSAFE_KEYS = ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a\\b", "a\x00b", "a\nb",
               "x" * 1100]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the contract, on every backend ---------------------------------------------------------------


def test_put_get_head_bytes(store) -> None:
    info = store.put_bytes("run/a.txt", b"hello")
    assert (info.size, info.sha256) == (5, sha(b"hello"))
    head = store.head("run/a.txt")
    assert head is not None and (head.size, head.sha256) == (5, sha(b"hello"))
    assert store.get_bytes("run/a.txt") == b"hello"
    store.put_bytes("run/a.txt", b"changed!")  # overwrite updates the identity
    assert store.head("run/a.txt").sha256 == sha(b"changed!")
    assert store.get_bytes("run/a.txt") == b"changed!"


def test_missing_objects(store) -> None:
    assert store.head("nope/x") is None
    with pytest.raises(ObjectNotFound, match="nope/x"):
        store.get_bytes("nope/x")
    with pytest.raises(ObjectNotFound):
        store.get_file("nope/x", "/tmp/never-written")
    store.delete("nope/x")  # idempotent, like S3


def test_put_file_get_file_with_metadata(store, tmp_path: Path) -> None:
    data = os.urandom(1_000_003)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    info = store.put_file("r/ckpt/w.bin", src, metadata={"kind": "weights"})
    assert info.sha256 == sha(data)
    got = store.get_file("r/ckpt/w.bin", tmp_path / "out" / "w.bin")
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
    assert got.sha256 == sha(data) and got.metadata.get("kind") == "weights"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "w.bin"]  # no temp left


def test_multipart_upload(backend: str, tmp_path: Path) -> None:  # noqa: F811
    from store_fixtures import unique_uri

    opts = None if backend == "file" else s3_options(
        backend, multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    st = open_store(unique_uri(backend, tmp_path), opts)
    data = os.urandom(11 * 1024 * 1024)  # three parts on S3
    (tmp_path / "big").write_bytes(data)
    st.put_file("big", tmp_path / "big")
    head = st.head("big")
    assert head.size == len(data) and head.sha256 == sha(data)
    if backend != "file":
        assert head.etag.endswith("-3")  # really multipart: the ETag is md5-of-parts, not identity
    st.get_file("big", tmp_path / "big2")
    assert (tmp_path / "big2").read_bytes() == data


def test_list_order_prefix_and_pages(store) -> None:
    keys = ["b/2", "a/1", "ab", "a/é", "a/z", "a/0/deep"]
    for k in keys:
        store.put_bytes(k, k.encode())
    listed = [o.key for o in store.list("")]
    assert listed == sorted(keys, key=lambda k: k.encode())  # UTF-8 byte order, as S3
    assert [o.key for o in store.list("a/")] == ["a/0/deep", "a/1", "a/z", "a/é"]
    assert [o.key for o in store.list("a")] == ["a/0/deep", "a/1", "a/z", "a/é", "ab"]
    assert [o.key for o in store.list("a/", start_after="a/1")] == ["a/z", "a/é"]
    assert [o.key for o in store.list("", page_size=2)] == listed  # several pages
    assert [o.size for o in store.list("b/")] == [3]
    assert list(store.list("zzz/")) == []


def test_conditional_writes(store) -> None:
    first = store.put_bytes("lock", b"v1", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("lock", b"v2", if_absent=True)
    assert store.get_bytes("lock") == b"v1"
    second = store.put_bytes("lock", b"v2", if_match=store.head("lock").etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("lock", b"v3", if_match=first.etag)  # stale
    assert store.get_bytes("lock") == b"v2" and second.sha256 == sha(b"v2")


def test_delete(store) -> None:
    store.put_bytes("d/x", b"1")
    store.put_bytes("d/y", b"2")
    store.delete("d/x")
    assert store.head("d/x") is None
    assert [o.key for o in store.list("d/")] == ["d/y"]
    store.delete("d/y")
    store.put_bytes("d", b"a key where a folder was")  # legal again once d/ is empty
    assert store.get_bytes("d") == b"a key where a folder was"


def test_url_is_fetchable(store) -> None:
    store.put_bytes("u/page.txt", b"presigned")
    url = store.url("u/page.txt", expires=60)
    assert url.startswith(("file://", "http://"))
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.read() == b"presigned"


def test_unsafe_keys_refused(store, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    for key in UNSAFE_KEYS:
        for call in (lambda: store.put_bytes(key, b"x"), lambda: store.put_file(key, tmp_path / "f"),
                     lambda: store.head(key), lambda: store.get_bytes(key),
                     lambda: store.delete(key)):
            with pytest.raises(StoreError, match="unsafe object key"):
                call()
    assert list(store.list("")) == []


# -- keys and URIs ---------------------------------------------------------------------------------


def test_validate_key_accepts_normal_keys() -> None:
    for key in ["a", "run-1/checkpoint/ema.pt", "a/.hidden", "é/ü", "a..b/c"]:
        assert validate_key(key) == key


def test_open_store_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert open_store("file:rel/dir").uri == f"file://{tmp_path}/rel/dir"
    assert open_store(f"file://{tmp_path}/x").uri == f"file://{tmp_path}/x"
    s3 = open_store("s3://bucket/some/prefix/", S3Options(endpoint_url="http://127.0.0.1:9"))
    assert s3.uri == "s3://bucket/some/prefix"
    for bad in ["", "http://x/y", "s3://", "file://host/x", "file:", "s3://b/a/../c"]:
        with pytest.raises(StoreError):
            open_store(bad)


# -- file:// specifics -----------------------------------------------------------------------------


def test_file_store_conflicts_and_temp_files(tmp_path: Path) -> None:
    st = open_store(f"file://{tmp_path}")
    st.put_bytes("a", b"1")
    with pytest.raises(StoreError, match="conflicts"):
        st.put_bytes("a/b", b"2")
    st.put_bytes("c/d", b"3")
    with pytest.raises(StoreError, match="conflicts"):
        st.put_bytes("c", b"4")
    (tmp_path / "c" / ".e.tmp-123").write_bytes(b"half written")
    assert [o.key for o in st.list("")] == ["a", "c/d"]  # no temp, no .meta
    with pytest.raises(StoreError, match="reserved"):
        st.put_bytes(".meta/a.json", b"x")


def test_file_store_detects_corruption_and_stale_sidecar(tmp_path: Path) -> None:
    st = open_store(f"file://{tmp_path}")
    st.put_bytes("k", b"original")
    (tmp_path / "k").write_bytes(b"originaX")  # same size, bit rot; mtime changes
    # The sidecar no longer matches the stat, so head re-hashes instead of trusting it ...
    assert st.head("k").sha256 == sha(b"originaX")
    # ... but a corruption that keeps size and mtime is caught by the recorded sha256.
    st.put_bytes("k", b"original")
    st_before = os.stat(tmp_path / "k")
    (tmp_path / "k").write_bytes(b"originaX")
    os.utime(tmp_path / "k", ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    with pytest.raises(ChecksumMismatch, match="sha256 mismatch"):
        st.get_bytes("k")


# -- S3 specifics: corruption, auth, outages -------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["moto", "seaweed"])
def test_s3_get_detects_object_not_matching_its_sha(backend_name: str) -> None:
    opts = s3_options(backend_name)
    st = open_store(f"s3://{TEST_BUCKET}/corrupt-{time.time_ns()}", opts)
    st.put_bytes("x", b"good bytes")
    # Rewrite the object behind our back, keeping the old sha256 metadata.
    st.client.put_object(Bucket=TEST_BUCKET, Key=st._k("x"), Body=b"evil bytes",
                         Metadata={"sha256": sha(b"good bytes")})
    with pytest.raises(ChecksumMismatch, match="sha256 mismatch"):
        st.get_bytes("x")


def test_wrong_credentials_one_clear_line() -> None:
    server = seaweed_server()
    good = server.options(max_attempts=1)
    for key, secret, code in [(good.access_key, "not-the-secret", "SignatureDoesNotMatch"),
                              ("AKIDWRONG", "not-the-secret", "InvalidAccessKeyId")]:
        opts = S3Options(endpoint_url=good.endpoint_url, access_key=key, secret_key=secret,
                         max_attempts=1)
        st = open_store(f"s3://{TEST_BUCKET}/auth", opts)
        with pytest.raises(StoreError) as err:
            st.put_bytes("x", b"1")
        msg = str(err.value)
        assert msg == (f"S3 rejected the credentials for s3://{TEST_BUCKET} ({code}): "
                       "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        assert secret not in msg and good.secret_key not in msg
        with pytest.raises(StoreError, match="rejected the credentials"):
            list(st.list(""))
        with pytest.raises(StoreError) as err:
            st.head("x")  # HEAD answers a bare 403; the message still names the cause
        assert str(err.value) == msg


def test_store_down_fails_fast_with_one_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    st = open_store("s3://b/p", S3Options(endpoint_url=f"http://127.0.0.1:{port}",
                                          access_key="k", secret_key="s", max_attempts=2,
                                          connect_timeout=1))
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        st.put_bytes("x", b"1")
    assert time.monotonic() - t0 < 5
    assert str(err.value).startswith(f"cannot reach the S3 endpoint http://127.0.0.1:{port} ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("backend_name", ["moto", "seaweed"])
def test_missing_bucket_message_and_no_bucket_made(backend_name: str) -> None:
    st = open_store("s3://no-such-bucket-pgolf/p", s3_options(backend_name))
    with pytest.raises(StoreError, match="bucket s3://no-such-bucket-pgolf does not exist"):
        st.check_bucket()
    with pytest.raises(StoreError, match="bucket s3://no-such-bucket-pgolf does not exist"):
        st.put_bytes("x", b"1")  # SeaweedFS would create it without -s3.autoCreateBucket=false
    assert "no-such-bucket-pgolf" not in [b["Name"] for b in st.client.list_buckets()["Buckets"]]
