#!/usr/bin/env bash
# Run the on-board runtime (devices/runtime.py) on an emulated aarch64 board (ARCHITECTURE.md §7):
# the sysroot's aarch64 python3.11 under qemu-aarch64-static -cpu cortex-a72, with the aarch64
# onnxruntime / numpy wheels, seeing an ARM /proc/cpuinfo.
#
# Usage: bash devices/arm/run_emulated.sh [CACHE_DIR] -- RUNTIME_ARGS...
#   e.g. bash devices/arm/run_emulated.sh -- --model model.int8.onnx --probe probe.npz --out result.json
#   CACHE_DIR defaults to ${EDGE_QMUL_ARM_CACHE:-$HOME/.cache/edge-qmul/arm64} (build it first with
#   build_sysroot.sh). The runtime's exit code is passed through (0 pass, 1 check failed, 2 bad input);
#   this script's own errors (no cache, no privilege for the mount namespace) exit 2 as well.
#   EDGE_QMUL_RUNTIME overrides the runtime script (default: devices/runtime.py of this repository).
#
# Needs root (for `unshare -m` and the bind mount); without root it tries an unprivileged user
# namespace (`unshare -r -m`), which works where the kernel allows it.
set -euo pipefail

die() { printf 'run_emulated: error: %s\n' "$*" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

CACHE="${EDGE_QMUL_ARM_CACHE:-$HOME/.cache/edge-qmul/arm64}"
if [[ $# -gt 0 && "$1" != "--" ]]; then CACHE="$1"; shift; fi
[[ $# -gt 0 && "$1" == "--" ]] || die "usage: run_emulated.sh [CACHE_DIR] -- RUNTIME_ARGS..."
shift
CACHE="$(cd "$CACHE" 2>/dev/null && pwd -P)" || die "no cache directory: run devices/arm/build_sysroot.sh first"
[[ -f "$CACHE/READY" ]] || die "cache $CACHE is incomplete (no READY): run devices/arm/build_sysroot.sh $CACHE"
command -v qemu-aarch64-static >/dev/null || die "qemu-aarch64-static is missing: run devices/arm/build_sysroot.sh"
RUNTIME="${EDGE_QMUL_RUNTIME:-$REPO/devices/runtime.py}"
[[ -f "$RUNTIME" ]] || die "runtime script not found: $RUNTIME"
SYSROOT="$CACHE/sysroot"

# Step 1 (outside): re-run this script in a private mount namespace. The bind mount below is then
# visible to this process tree only: every other process on the host keeps the real /proc/cpuinfo,
# and the mount disappears with the namespace, even if the run is killed.
if [[ -z "${_EDGE_QMUL_ARM_NS:-}" ]]; then
  userns=()
  [[ $EUID -eq 0 ]] || userns=(-r)  # unprivileged: map ourselves to root in a new user namespace
  # util-linux unshare makes the new namespace's mounts private (no propagation back to the host).
  exec env _EDGE_QMUL_ARM_NS=1 unshare "${userns[@]}" -m -- bash "$HERE/run_emulated.sh" "$CACHE" -- "$@"
fi

# Step 2 (inside the namespace): an ARM /proc/cpuinfo. onnxruntime's CPU detection parses it and, given
# the host's x86 text while running as aarch64, crashes; qemu-user 7.2 does not emulate the file.
mount --bind "$CACHE/cpuinfo" /proc/cpuinfo || die "cannot bind-mount $CACHE/cpuinfo over /proc/cpuinfo"

# Step 3: the aarch64 python. qemu -L makes the guest's absolute paths (/lib/ld-linux-aarch64.so.1,
# /usr/lib/aarch64-linux-gnu/...) resolve inside the sysroot first, falling back to the host's files
# (the model, probe and output paths). PYTHONHOME points python at the sysroot's standard library
# (usr/lib/python3.11 and its lib-dynload of aarch64 extension modules); PYTHONPATH adds the unzipped
# wheels. `-S` skips site.py: Debian's site.py would add /usr/local/lib/python3.11/dist-packages,
# which qemu's fallback would resolve to the host's x86 packages. LD_* variables from the host would
# be honoured by the guest's dynamic loader, so they are dropped.
exec env -u LD_PRELOAD -u LD_LIBRARY_PATH -u PYTHONSTARTUP -u _EDGE_QMUL_ARM_NS \
  PYTHONHOME="$SYSROOT/usr" PYTHONPATH="$CACHE/site" PYTHONNOUSERSITE=1 \
  qemu-aarch64-static -cpu cortex-a72 -L "$SYSROOT" \
  "$SYSROOT/usr/bin/python3.11" -S "$RUNTIME" "$@"
