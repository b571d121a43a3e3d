"""Pin the FlashAttention 3 wheel: find the newest flash_attn_3 wheel in FA3_INDEX for our image
(Linux x86_64, CPython 3.12), download it once, and write its URL and sha256 into docker/fa3.lock.

Trust on first use, written down: after this runs, every build and every cloud setup verifies the
same bytes, and a changed upstream wheel fails loudly instead of slipping in. Commit fa3.lock.
Usage (what `make fa3-pin` runs): python docker/pin_fa3.py [docker/fa3.lock]
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def read_lock(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Z0-9_]+)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2).strip()
    return values


def write_pin(path: Path, url: str, sha256: str) -> None:
    """Replace the FA3_WHEEL_URL / FA3_WHEEL_SHA256 lines, keeping every comment."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    text = path.read_text(encoding="utf-8")
    for key, value in (("FA3_WHEEL_URL", url), ("FA3_WHEEL_SHA256", sha256)):
        text, count = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", text)
        if count != 1:
            raise ValueError(f"{path} must contain exactly one {key}= line")
    path.write_text(text, encoding="utf-8")


def resolve_wheel_url(index: str) -> str:
    """Ask pip which wheel it would install from the index for the image's platform."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
               "--no-index", "--find-links", index, "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--target", str(Path(tmp) / "t"), "--report", str(report)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd + ["flash_attn_3"], check=True)
        install = json.loads(report.read_text())["install"]
    return install[0]["download_info"]["url"]


def sha256_of_url(url: str) -> str:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=300) as response:  # noqa: S310 (https index URL)
        while block := response.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    lock = Path(argv[1] if len(argv) > 1 else Path(__file__).with_name("fa3.lock"))
    index = read_lock(lock)["FA3_INDEX"]
    url = resolve_wheel_url(index)
    sha = sha256_of_url(url)
    write_pin(lock, url, sha)
    print(f"pinned {url}\n  sha256 {sha}\n  in {lock}: commit it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
