#!/usr/bin/env bash
# Node-side steps shared by the sky/*.yaml setup and run blocks (runs on the cloud machine,
# from the synced workdir). Kept in one script so every YAML checks GPUs and installs the same way.
#
#   bash sky/node.sh gpus COUNT [sxm|any]   fail fast unless exactly COUNT H100s (SXM if asked)
#   bash sky/node.sh install [--require-fa3|--cpu]
#                                           install pgolf from the workdir; a C compiler, deps and
#                                           the pinned FA3 wheel only when missing; then
#                                           docker/selftest.py --cuda (compiles the training step)
#   bash sky/node.sh compiler                what torch.compile needs: a C compiler (gcc installed
#                                           with apt-get when missing and root) and Python.h
#   bash sky/node.sh phase NAME START_EPOCH  add now-START seconds to phase NAME in the phases file
#   bash sky/node.sh env                     print the image/version facts the run records
#   bash sky/node.sh code FILE SHA256        fail fast unless FILE (the generated train_gpt.py that
#                                           pgolf launch shipped) is there with exactly that sha256
set -euo pipefail

PHASES_FILE="${PGOLF_PHASES_FILE:-$HOME/.pgolf/phases.json}"
LOCK_FILE="docker/requirements.lock"
PY="${PYTHON:-python}"

die() {
  echo "node.sh: error: $*" >&2
  exit 1
}

# --- GPUs -------------------------------------------------------------------------------------
# On RunPod `H100` is the PCIe card and `H100-SXM` reports as "NVIDIA H100 80GB HBM3"; AWS p5,
# GCP a3-highgpu and Lambda sxm5 boxes report the same HBM3 name. PCIe and NVL parts say so.
is_sxm_name() {
  case "$1" in
    *PCIe* | *PCIE* | *NVL*) return 1 ;;
    *HBM3* | *SXM*) return 0 ;;
    *) return 1 ;;
  esac
}

check_gpus() {
  local want="$1" kind="${2:-any}" name count
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this node has no NVIDIA driver"
  local out names=()
  out="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1)" ||
    die "nvidia-smi failed (${out:-no output}): no usable GPU; found 0 GPU(s), need $want"
  mapfile -t names < <(printf '%s\n' "$out" | sed '/^[[:space:]]*$/d')
  count="${#names[@]}"
  [[ "$count" -eq "$want" ]] || die "found $count GPU(s), need exactly $want H100 (${names[*]:-none})"
  for name in "${names[@]}"; do
    [[ "$name" == *H100* ]] || die "GPU '$name' is not an H100; relaunch on H100 (see sky/record.yaml)"
    if [[ "$kind" == sxm ]] && ! is_sxm_name "$name"; then
      die "GPU '$name' is not H100 SXM; on RunPod ask for H100-SXM:8, never H100:8 (that is PCIe)"
    fi
  done
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvidia-smi topo -m || true # NVLink matrix in the log: the proof of SXM for reviewers
  echo "node.sh: ok: $count x ${names[0]} ($kind)"
}

# --- C compiler -------------------------------------------------------------------------------
# torch.compile builds C at run time (inductor's CPU kernels, Triton's GPU launcher) against
# Python.h. The public pytorch/pytorch:*-runtime images have no C compiler, so without this a run
# gets through setup and the data download and then dies compiling its first step.
c_compiler() {
  local cc
  for cc in "${CC:-}" gcc cc clang; do
    if [[ -n "$cc" ]] && command -v "$cc" >/dev/null 2>&1; then
      echo "$cc"
      return 0
    fi
  done
  return 1
}

ensure_compiler() {
  local cc inc tmp
  if ! c_compiler >/dev/null && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "node.sh: no C compiler on this image; installing gcc with apt-get (torch.compile needs one)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      gcc libc6-dev; } >/dev/null 2>&1 || echo "node.sh: apt-get install gcc failed" >&2
  fi
  cc="$(c_compiler)" || die "no C compiler (gcc, cc or clang) on PATH and none could be installed: torch.compile needs one; install gcc or use an image from make image"
  inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" ||
    die "$PY cannot report its include folder"
  [[ -f "$inc/Python.h" ]] || die "Python.h is missing from $inc: torch.compile builds against it; install the python dev headers (python3-dev)"
  tmp="$(mktemp -d)"
  printf '#include <Python.h>\nint main(void) { return 0; }\n' >"$tmp/probe.c"
  if ! "$cc" -I"$inc" -c "$tmp/probe.c" -o "$tmp/probe.o" 2>"$tmp/err"; then
    die "$cc cannot compile against $inc/Python.h ($(head -n 1 "$tmp/err")); install gcc and libc6-dev"
  fi
  rm -rf "$tmp"
  echo "node.sh: ok: C compiler $cc, Python.h in $inc"
}

# --- install ----------------------------------------------------------------------------------
deps_present() {
  "$PY" -c "import numpy, sentencepiece, boto3, brotli, zstandard, huggingface_hub, python_minifier" \
    2>/dev/null
}

install_deps_from_lock() {
  # The lock's hashes are for CPython 3.12 wheels (our image); a public base image may run another
  # Python, so this fallback installs the same versions by pin only. torch and its CUDA wheels
  # come with the base image; setuptools stays the image's own (build-time only).
  local reqs
  reqs="$(mktemp)"
  grep -E '^[A-Za-z0-9_.-]+==' "$LOCK_FILE" | sed 's/ .*//' |
    grep -v -E '^(torch|triton|nvidia-|setuptools)' >"$reqs"
  echo "node.sh: installing $(wc -l <"$reqs") pinned deps from $LOCK_FILE (no hashes: python $("$PY" -V))"
  "$PY" -m pip install --no-deps -q -r "$reqs"
  rm -f "$reqs"
}

fa3_present() {
  "$PY" -c "from flash_attn_interface import flash_attn_func" 2>/dev/null
}

install_fa3() {
  local dir
  dir="$(mktemp -d)"
  bash docker/fetch-fa3.sh "$dir" --allow-unpinned >/dev/null
  "$PY" -m pip install -q --no-deps "$dir"/*.whl
  rm -rf "$dir"
}

install() {
  local mode="${1:-}"
  if [[ "$mode" != --cpu ]]; then
    "$PY" -c "import torch" 2>/dev/null ||
      die "torch is missing: use the YAML's default image_id or an image from make image"
    ensure_compiler # before anything else: the first compiled step must not be where this shows
  fi
  deps_present || install_deps_from_lock
  # Always (re)install pgolf editable from the synced workdir: `sky exec` resyncs the workdir, so
  # the code that runs is the code you have, never a stale copy baked into the image.
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . ||
    "$PY" -m pip install -q --no-deps -e .
  if [[ "$mode" == --cpu ]]; then
    "$PY" -c "import pgolf; print('pgolf', pgolf.__version__)"
    return
  fi
  fa3_present || install_fa3 || echo "node.sh: WARNING: FA3 install failed" >&2
  # --cuda also compiles the training step of $PRESET's stack (small) and Newton-Schulz on a GPU
  if [[ "$mode" == --require-fa3 ]]; then
    "$PY" docker/selftest.py --cuda --torch 2.9.1 --cuda-version 12.8 --preset "${PRESET:-seed}"
  else
    fa3_present || echo "node.sh: WARNING: FA3 missing; ATTENTION_BACKEND=auto uses SDPA (slower)" >&2
    "$PY" docker/selftest.py --cuda --no-fa3 --preset "${PRESET:-seed}"
  fi
}

# --- the shipped train_gpt.py -----------------------------------------------------------------
check_code() {
  local file="$1" want="${2:-}" got
  [[ -f "$file" ]] || die "$file is missing: pgolf launch generates it from your checkout and ships it with the workdir (plain sky launch: see the task's header)"
  [[ -n "$want" ]] || die "CODE_SHA256 is empty: pass --env CODE_SHA256=<sha256 of $file> (pgolf launch sets it)"
  got="$(sha256sum "$file" | cut -d' ' -f1)"
  [[ "$got" == "$want" ]] || die "$file has sha256 $got, not CODE_SHA256=$want: it is not the file that was launched; relaunch with pgolf launch"
  echo "node.sh: ok: $file, $(wc -c <"$file") B, sha256 $got (runs here and ships in a submission)"
}

# --- phases (for the cost estimate) -----------------------------------------------------------
add_phase() {
  local name="$1" start="$2" now
  now="$(date +%s)"
  mkdir -p "$(dirname "$PHASES_FILE")"
  "$PY" - "$PHASES_FILE" "$name" "$((now - start))" <<'PYEOF'
import json, os, sys
path, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
phases = json.load(open(path)) if os.path.exists(path) else {}
phases[name] = phases.get(name, 0.0) + seconds
tmp = path + ".tmp"
with open(tmp, "w") as fh:
    json.dump(phases, fh)
os.replace(tmp, path)
print(f"node.sh: phase {name}: {seconds:.0f} s")
PYEOF
}

print_env() {
  echo "IMAGE=${IMAGE:-} IMAGE_DIGEST=${IMAGE_DIGEST:-} $("$PY" -V) host=$(hostname)"
}

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    gpus) check_gpus "$@" ;;
    install) install "$@" ;;
    compiler) ensure_compiler ;;
    phase) add_phase "$@" ;;
    env) print_env ;;
    code) check_code "$@" ;;
    *) die "usage: node.sh gpus COUNT [sxm|any] | install [--require-fa3|--cpu] | compiler | phase NAME START | env | code FILE SHA256" ;;
  esac
}

main "$@"
