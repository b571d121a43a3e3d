#!/usr/bin/env bash
# Download the pinned FlashAttention 3 wheel into DEST_DIR and verify its sha256.
# Used by docker/Dockerfile (URL and sha256 as build args) and sky/node.sh (public-image path).
#
#   bash docker/fetch-fa3.sh DEST_DIR [--allow-unpinned]
#
# FA3_WHEEL_URL / FA3_WHEEL_SHA256 / FA3_INDEX from the environment win over docker/fa3.lock.
# Without a pin it fails, unless --allow-unpinned: then it takes the newest wheel from FA3_INDEX
# and prints its sha256 so you can pin it (make fa3-pin does that for you).
set -euo pipefail

die() {
  echo "fetch-fa3.sh: error: $*" >&2
  exit 1
}

here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:?usage: fetch-fa3.sh DEST_DIR [--allow-unpinned]}"
allow="${2:-}"

lock_value() { # KEY -> value from fa3.lock (parsed, never sourced)
  [[ -f "$here/fa3.lock" ]] || return 0
  sed -n "s/^$1=//p" "$here/fa3.lock" | tail -n 1
}

url="${FA3_WHEEL_URL:-$(lock_value FA3_WHEEL_URL)}"
sha="${FA3_WHEEL_SHA256:-$(lock_value FA3_WHEEL_SHA256)}"
index="${FA3_INDEX:-$(lock_value FA3_INDEX)}"
py="$(command -v python3 || command -v python)"
mkdir -p "$dest"

if [[ -n "$url" && -n "$sha" ]]; then
  # the wheel's own file name, %2B decoded: pip refuses a wheel whose name is still URL-quoted
  name="$("$py" -c 'import sys, urllib.parse; print(urllib.parse.unquote(sys.argv[1].rsplit("/", 1)[-1]))' "$url")"
  curl -fsSL --retry 3 -o "$dest/$name" "$url"
  echo "$sha  $dest/$name" | sha256sum -c - >&2 ||
    die "sha256 mismatch for $url (pinned $sha); re-pin with make fa3-pin"
elif [[ "$allow" == --allow-unpinned ]]; then
  echo "fetch-fa3.sh: WARNING: FA3 wheel not pinned in docker/fa3.lock; taking the newest from $index" >&2
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$dest" --find-links "$index" flash_attn_3
  sha256sum "$dest"/*.whl >&2
else
  die "FA3 wheel not pinned (docker/fa3.lock FA3_WHEEL_URL/FA3_WHEEL_SHA256 empty); run make fa3-pin"
fi
ls "$dest"/*.whl
