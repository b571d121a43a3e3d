"""Atomic writes never leave half a file or a temp file behind; hashes match hashlib."""

from __future__ import annotations

import hashlib
import json

import pytest

from pgolf.fileio import atomic_write, atomic_write_bytes, atomic_write_json, sha256_file


def test_atomic_write_replaces_whole_file_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 10_000  # spans several read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
