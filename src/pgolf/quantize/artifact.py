"""The artifact container (`artifact.pgz`): our own documented format, one compressed body.

File layout (all integers little-endian):

    offset  size  field
    0       4     magic b"PGQZ"
    4       2     format version (u16): 2, or 3 when the body is stored as streams (id 5)
    6       1     compressor id (u8): 1 zlib-9, 2 lzma (raw LZMA2, preset 9|extreme), 3 zstd-22,
                  4 brotli-11 (window 24), 5 streams (format 3), 6 lrzip -z -L 9 (ZPAQ; opt-in,
                  needs the lrzip binary to load)
    7       1     reserved, 0
    8       8     body length before compression (u64)
    16      8     compressed length (u64) = file size - 56
    24      32    sha256 of bytes 0..23 followed by the compressed body
    56      ...   compressed body

Streams (id 5, the `grouped` layout): the body is cut into segments, each compressed on its own by
the compressor that makes it smallest; the compressed region is u32 n, then n records (u8 compressor
id 1-4 or 6, u64 raw length, u64 compressed length), then the n compressed segments. The body is their
decompressed concatenation.

The body (the tensor table, payload encodings, the `grouped` layout's segments) is documented in
pgolf.quantize.body.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.errors import ArtifactError
# the body's names that callers reach through this module (artifact.Entry, artifact.encode_body, ...)
from pgolf.quantize.body import (GROUPED, LAYOUTS, ROLE_ORDER, Entry, decode_body, dequantize_entry,  # noqa: F401
                                 encode_body, encode_segments, lowrank_delta, pack_bits, unpack_bits)

MAGIC = b"PGQZ"
VERSION = 2  # 2: the body header carries "meta" (the artifact describes its model)
STREAMS_VERSION = 3  # 3: the body is stored as separately compressed streams (the grouped layout)
PREFIX = struct.Struct("<4sHBBQQ")  # magic, version, compressor id, reserved, body len, comp len
HEADER_BYTES = PREFIX.size + 32
COMPRESSORS = {"zlib": 1, "lzma": 2, "zstd": 3, "brotli": 4}  # COMPRESSOR=auto tries these
# opt-in only (COMPRESSOR=lrzip or auto+lrzip): needs a system binary at quantize AND at load time
OPTIONAL_COMPRESSORS = {"lrzip": 6}
COMPRESSOR_IDS = {**COMPRESSORS, **OPTIONAL_COMPRESSORS}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSOR_IDS.items()}
LRZIP_HINT = "install the lrzip binary (apt-get install lrzip) or set COMPRESSOR=auto"
STREAMS_ID = 5
STREAM_RECORD = struct.Struct("<BQQ")  # compressor id, raw length, compressed length
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


# ---------------------------------------------------------------------------------------------
# compressors


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise ArtifactError("compressor zstd needs the zstandard package; pip install zstandard") from None
    return zstandard


def _brotli():
    try:
        import brotli
    except ImportError:
        raise ArtifactError("compressor brotli needs the brotli package; pip install brotli") from None
    return brotli


def _lrzip(args: list[str], data: bytes, suffix: str) -> bytes:
    """Run the lrzip binary on `data` through temporary files (it reads and writes files only)."""
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which("lrzip")
    if exe is None:
        raise ArtifactError(f"compressor lrzip needs the lrzip binary, which is not on PATH; {LRZIP_HINT}")
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        src, dst = Path(tmp) / f"in{suffix}", Path(tmp) / "out"
        src.write_bytes(data)
        res = subprocess.run([exe, "-q", "-f", *args, "-o", str(dst), str(src)], capture_output=True)
        if res.returncode != 0 or not dst.is_file():
            msg = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
            raise ArtifactError(f"lrzip {' '.join(args)} failed (exit {res.returncode}: {msg[-1] if msg else 'no output'})")
        return dst.read_bytes()


def require(name: str) -> None:
    """A one-line error now, before any work, when a compressor's library or binary is missing."""
    if name == "lrzip":
        import shutil

        if shutil.which("lrzip") is None:
            raise ArtifactError(f"COMPRESSOR includes lrzip, but the lrzip binary is not on PATH; {LRZIP_HINT}")
        return
    compress(name, b"")


def compress(name: str, data: bytes) -> bytes:
    if name == "lrzip":  # ZPAQ backend, level 9 (#2135's per-group compressor)
        return _lrzip(["-z", "-L", "9"], data, "")
    if name == "zlib":
        return zlib.compress(data, 9)
    if name == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if name == "zstd":
        return _zstd().ZstdCompressor(level=22, write_content_size=True).compress(data)
    if name == "brotli":
        return _brotli().compress(data, quality=11, lgwin=24)
    raise ArtifactError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")


def decompress(name: str, data: bytes, size: int) -> bytes:
    if name == "lrzip":
        if not size:
            return b""
        return _lrzip(["-d"], data, ".lrz")
    if name == "zlib":
        return zlib.decompress(data)
    if name == "lzma":
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if name == "zstd":
        return _zstd().ZstdDecompressor().decompress(data, max_output_size=size)
    if name == "brotli":
        return _brotli().decompress(data)
    raise ArtifactError(f"unknown compressor {name!r}")


# ---------------------------------------------------------------------------------------------
# the file


def frame(body: bytes, compressor: str, compressed: bytes | None = None) -> bytes:
    comp = compress(compressor, body) if compressed is None else compressed
    prefix = PREFIX.pack(MAGIC, VERSION, COMPRESSOR_IDS[compressor], 0, len(body), len(comp))
    return prefix + hashlib.sha256(prefix + comp).digest() + comp


def frame_streams(streams: list[tuple[str, int, bytes]]) -> bytes:
    """A format-3 file from (compressor name, raw length, compressed bytes) per body segment."""
    comp = struct.pack("<I", len(streams))
    comp += b"".join(STREAM_RECORD.pack(COMPRESSOR_IDS[n], raw, len(c)) for n, raw, c in streams)
    comp += b"".join(c for _, _, c in streams)
    body_len = sum(raw for _, raw, _ in streams)
    prefix = PREFIX.pack(MAGIC, STREAMS_VERSION, STREAMS_ID, 0, body_len, len(comp))
    return prefix + hashlib.sha256(prefix + comp).digest() + comp


def _decompress_checked(name: str, data: bytes, size: int, where: str) -> bytes:
    try:
        out = decompress(name, data, size)
    except ArtifactError:
        raise
    except Exception as exc:  # zlib.error, lzma.LZMAError, zstd.ZstdError, brotli.error
        raise ArtifactError(f"{where} does not decompress with {name} ({type(exc).__name__}); the file is corrupted") from None
    if len(out) != size:
        raise ArtifactError(f"{where} decompresses to {len(out):,} B, its header says {size:,}; the file is corrupted")
    return out


def _unstream(comp: bytes, body_len: int, where: str) -> tuple[bytes, str]:
    try:
        (n,) = struct.unpack_from("<I", comp, 0)
        recs = [STREAM_RECORD.unpack_from(comp, 4 + i * STREAM_RECORD.size) for i in range(n)]
    except struct.error:
        raise ArtifactError(f"{where}: stream table is truncated; the file is corrupted") from None
    pos = 4 + n * STREAM_RECORD.size
    if pos + sum(r[2] for r in recs) != len(comp) or sum(r[1] for r in recs) != body_len:
        raise ArtifactError(f"{where}: stream lengths do not add up to the file; the file is corrupted")
    parts, names = [], []
    for i, (cid, raw, clen) in enumerate(recs):
        if cid not in COMPRESSOR_NAMES:
            raise ArtifactError(f"{where}: stream {i} names unknown compressor id {cid}; the file is corrupted")
        names.append(COMPRESSOR_NAMES[cid])
        parts.append(_decompress_checked(names[-1], comp[pos : pos + clen], raw, f"{where} stream {i}"))
        pos += clen
    return b"".join(parts), "per-group(" + ",".join(names) + ")"


def unframe(blob: bytes, where: str = "artifact") -> tuple[bytes, str]:
    """(body, compressor name) or a one-line ArtifactError."""
    if len(blob) < HEADER_BYTES:
        raise ArtifactError(f"{where} is {len(blob)} B, shorter than the {HEADER_BYTES}-byte header; it is truncated")
    magic, version, cid, _, body_len, comp_len = PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise ArtifactError(f"{where} does not start with {MAGIC!r} (found {magic!r}); not a pgolf artifact")
    if version not in (VERSION, STREAMS_VERSION):
        raise ArtifactError(f"{where} has format version {version}, this pgolf reads {VERSION} and "
                            f"{STREAMS_VERSION}; use a matching pgolf")
    if (cid == STREAMS_ID) != (version == STREAMS_VERSION) or (cid != STREAMS_ID and cid not in COMPRESSOR_NAMES):
        raise ArtifactError(f"{where} names unknown compressor id {cid} for format {version}; the file is corrupted")
    comp = blob[HEADER_BYTES:]
    if len(comp) != comp_len:
        raise ArtifactError(
            f"{where} holds {len(comp):,} compressed bytes, its header says {comp_len:,}; "
            "the file is truncated or padded, re-copy it"
        )
    if hashlib.sha256(blob[: PREFIX.size] + comp).digest() != blob[PREFIX.size : HEADER_BYTES]:
        raise ArtifactError(f"{where} fails its sha256 check; the file is corrupted, re-copy or re-quantize it")
    if cid == STREAMS_ID:
        return _unstream(comp, body_len, where)
    name = COMPRESSOR_NAMES[cid]
    return _decompress_checked(name, comp, body_len, where), name


# Compressor selection. brotli holds the GIL, so threads ran the 4 compressors x 2 layouts one after
# another (brotli-11 alone ~0.3 MB/s); each candidate now runs in its own forked process. Bodies of
# PROBE_MIN_BYTES or more are first probed: every candidate compresses the same deterministic sample
# (PROBE_SLICES evenly spaced slices), and only those whose size, scaled to the whole body, is within
# PROBE_MARGIN of the best estimate are compressed in full. The choice stays a function of the bytes.
PROBE_MIN_BYTES = 8 << 20
PROBE_SLICES, PROBE_SLICE_BYTES = 8, 256 << 10
PROBE_MARGIN = 0.02
# relative single-core cost of each compressor on int6 values (s/MB on the busy 2-core bench CPU), for ordering
SECONDS_PER_MB = {"lrzip": 5.0, "brotli": 4.8, "lzma": 2.8, "zstd": 1.9, "zlib": 0.13}


def _probe_sample(body: bytes) -> bytes:
    step = len(body) // PROBE_SLICES
    return b"".join(body[i * step : i * step + PROBE_SLICE_BYTES] for i in range(PROBE_SLICES))


def _compress_child(conn, name: str, data: bytes) -> None:
    """Forked worker: compress, send b"\0" + bytes (or b"\1" + the error), leave without cleanup."""
    try:
        conn.send_bytes(b"\0" + compress(name, data))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send_bytes(b"\1" + f"{type(exc).__name__}: {exc}".encode())
    finally:
        conn.close()
        os._exit(0)  # no atexit/finalizers: the parent may hold CUDA, NCCL or store threads


def compress_parallel(jobs: list[tuple[str, bytes]], workers: int) -> list[bytes]:
    """[compress(name, data) for name, data in jobs], at most `workers` at a time in forked processes.

    Fork (not spawn): the children inherit the bodies without a copy and import nothing; each runs one
    compressor's C code and exits with os._exit, which is safe in a multi-threaded parent."""
    if workers <= 1 or len(jobs) <= 1:
        return [compress(name, data) for name, data in jobs]
    import multiprocessing
    import warnings
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    results: list[bytes | None] = [None] * len(jobs)
    # longest first, so that with fewer workers than jobs the slow ones do not start last
    pending = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1]) * SECONDS_PER_MB.get(jobs[i][0], 1.0))
    running: dict = {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_compress_child, args=(send, *jobs[i]), daemon=True)
            with warnings.catch_warnings():  # python >= 3.12 warns about fork in threaded parents (see above)
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            send.close()
            running[recv] = (i, proc)
        for conn in wait(list(running)):
            i, proc = running.pop(conn)
            try:
                msg = conn.recv_bytes()
            except EOFError:
                msg = b"\1worker died"
            conn.close()
            proc.join()
            if msg[:1] != b"\0":
                for other, p in running.values():
                    p.kill()
                raise ArtifactError(f"compressing with {jobs[i][0]} failed ({msg[1:].decode(errors='replace')}); "
                                    f"set COMPRESSOR to another one")
            results[i] = msg[1:]
    return [r for r in results if r is not None]


def _probe_skips(pieces: dict[str, bytes], contests: list[list[tuple[str, str]]],
                 workers: int) -> dict[tuple[str, str], float]:
    """{(piece, compressor): estimate / best estimate} of the candidates not worth compressing in full.

    A contest is a list of (piece, compressor) candidates of which one will be kept; one with two or
    more candidates and a piece of PROBE_MIN_BYTES or more is probed: each candidate compresses the
    same sample of its piece, and those whose size scaled to the piece is beyond PROBE_MARGIN of the
    contest's best estimate are skipped."""
    probed = [c for c in contests if len(c) > 1 and max(len(pieces[k]) for k, _ in c) >= PROBE_MIN_BYTES]
    if not probed:
        return {}
    samples = {k: _probe_sample(pieces[k]) for c in probed for k, _ in c}
    jobs = [job for c in probed for job in c]
    probes = compress_parallel([(n, samples[k]) for k, n in jobs], workers)
    est = {job: len(c) * len(pieces[job[0]]) / len(samples[job[0]]) for job, c in zip(jobs, probes)}
    out = {}
    for c in probed:
        best = min(est[job] for job in c)
        out.update({job: round(est[job] / best, 4) for job in c if est[job] > best * (1 + PROBE_MARGIN)})
    return out


def choose(entries: list[Entry], compressor: str = "auto", layout: str = "auto",
           meta: dict | None = None, workers: int | None = None, groups: bool = False,
           sort_roles: tuple[str, ...] = (), sort_device: str | torch.device = "cpu") -> tuple[bytes, dict]:
    """The smallest framed artifact over the allowed compressors and q layouts, and every size tried.

    With `groups`, the grouped layout competes too: each of its segments is compressed by every
    allowed compressor and keeps the smallest (a format-3 file of streams; rows of `sort_roles`
    similarity-sorted on `sort_device`). `workers`: compression processes (default: one per CPU,
    serial for bodies under 256 KiB). The info dict has the full sizes (`candidates`), the probe's
    verdict on the others (`skipped`: estimated size / best estimate), the compression wall time
    (`compress_seconds`, similarity sort included) and, with groups, each segment's choice (`groups`)."""
    import time

    t0 = time.perf_counter()
    names = list(COMPRESSORS) if compressor == "auto" else (
        [*COMPRESSORS, "lrzip"] if compressor == "auto+lrzip" else [compressor])
    layouts = list(LAYOUTS) if layout == "auto" else [layout]
    if not any(e.kind == "quant" and e.bits < 8 for e in entries):
        layouts = layouts[:1]  # packing changes nothing when no integer is narrower than 8 bits
    for n in names:  # fail before any work when a library or binary is missing
        require(n)
    pieces = {lay: encode_body(entries, lay, meta) for lay in layouts}
    segments = encode_segments(entries, GROUPED, meta, sort_roles, sort_device) if groups else []
    pieces.update({f"{GROUPED}:{label}": seg for label, seg in segments})
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = cores if max(len(b) for b in pieces.values()) >= 256 << 10 else 1
    contests = [[(lay, n) for lay in layouts for n in names]]
    contests += [[(f"{GROUPED}:{label}", n) for n in names] for label, _ in segments]
    skips = _probe_skips(pieces, contests, workers)
    jobs = [job for c in contests for job in c if job not in skips]
    results = dict(zip(jobs, compress_parallel([(n, pieces[k]) for k, n in jobs], workers)))
    sizes = {f"{lay}+{n}": len(results[(lay, n)]) + HEADER_BYTES for lay in layouts for n in names if (lay, n) in results}
    best = min(((lay, n) for lay in layouts for n in names if (lay, n) in results),
               key=lambda j: len(results[j]))  # ties: first in the fixed order
    blob = frame(pieces[best[0]], best[1], results[best])
    info = {"compressor": best[1], "layout": best[0], "body_bytes": len(pieces[best[0]])}
    skipped = {f"{k}+{n}": v for (k, n), v in skips.items() if not k.startswith(GROUPED)}
    group_info = []
    if segments:
        streams = []
        for label, seg in segments:
            k = f"{GROUPED}:{label}"
            n = min((n for n in names if (k, n) in results), key=lambda n: len(results[(k, n)]))
            streams.append((n, len(seg), results[(k, n)]))
            group_info.append({"segment": label, "raw_bytes": len(seg), "compressor": n, "bytes": len(results[(k, n)]),
                               "candidates": {m: len(results[(k, m)]) for m in names if (k, m) in results},
                               "skipped": {m: v for (kk, m), v in skips.items() if kk == k}})
        grouped = frame_streams(streams)
        sizes[f"{GROUPED}+per-group"] = len(grouped)
        if len(grouped) < len(blob):
            blob = grouped
            info = {"compressor": "per-group", "layout": GROUPED, "body_bytes": sum(len(s) for _, s in segments)}
    info.update(candidates=sizes, skipped=skipped, workers=workers, compress_seconds=round(time.perf_counter() - t0, 3))
    if segments:
        info["groups"] = group_info
    return blob, info


@dataclass
class Artifact:
    entries: list[Entry]
    compressor: str
    meta: dict  # pgolf.quantize.meta: model config, eval settings, tokenizer fingerprint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The dequantized state dict (float32 floats, the model's exact keys)."""
        return {e.name: dequantize_entry(e) for e in self.entries}


def read_artifact(path: str | os.PathLike[str]) -> Artifact:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"artifact {p} not found; run `pgolf quantize` first")
    body, name = unframe(p.read_bytes(), where=str(p))
    entries, meta = decode_body(body)
    return Artifact(entries, name, meta)


def load_artifact(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """artifact.pgz -> the dequantized state dict (float32 floats, the model's exact keys)."""
    return read_artifact(path).state_dict()
