#!/usr/bin/env bash
# Build (idempotently) what the on-board runtime needs to run on an emulated aarch64 board (ARCHITECTURE.md §7):
#
#   CACHE/sysroot/   an aarch64 Debian userland with python3.11, unpacked from Debian's arm64 packages
#   CACHE/site/      the aarch64 onnxruntime + numpy wheels (same versions as .venv), unzipped: PYTHONPATH
#   CACHE/cpuinfo    an ARM /proc/cpuinfo (4 x Cortex-A72), bind-mounted over the host's at run time
#   CACHE/READY      written last, with the versions: run_emulated.sh refuses a cache without it
#
# Usage: bash devices/arm/build_sysroot.sh [CACHE_DIR]
#   CACHE_DIR defaults to ${EDGE_QMUL_ARM_CACHE:-$HOME/.cache/edge-qmul/arm64}; it must lie outside the
#   repository (a few hundred MB of foreign binaries have no business in the work tree).
#
# Needs root (or passwordless sudo) only when something is missing system-wide: qemu-user-static, or the
# arm64 architecture in dpkg / its apt lists. A second run with everything in place downloads nothing.
#
# Exit codes: 0 ready; 75 a download failed for lack of network (the ARM test skips on this one only);
# 1 anything else (the message says what).
set -euo pipefail

EX_NONET=75
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${1:-${EDGE_QMUL_ARM_CACHE:-$HOME/.cache/edge-qmul/arm64}}"
# The venv whose onnxruntime / numpy versions the emulated board must match (x86 reference = same build).
VENV_PY="${EDGE_QMUL_PYTHON:-$REPO/.venv/bin/python}"

# Debian arm64 packages forming a minimal python3.11 userland (the ARCHITECTURE.md §7 list). They are unpacked,
# never installed: no maintainer scripts run and the host's dpkg database does not learn about them.
# Left out on purpose: libdb5.3 (only the dbm module) and libtirpc3's Kerberos libraries (only the nis
# module); the runtime imports neither. Debian's python3.11 bundles libmpdec, so none is needed.
PACKAGES=(
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
  libc6 zlib1g libexpat1 libssl3 libffi8 libgcc-s1 libstdc++6 libbz2-1.0 liblzma5 libsqlite3-0
  libtinfo6 libncursesw6 libreadline8 libuuid1 libnsl2 libtirpc3 libcrypt1
)

log() { printf 'build_sysroot: %s\n' "$*" >&2; }
die() { printf 'build_sysroot: error: %s\n' "$*" >&2; exit 1; }

# Run a command that needs root: directly as root, else through sudo if it works without a password.
as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"
  elif sudo -n true 2>/dev/null; then sudo -n "$@"
  else die "'$*' needs root: run this script as root once (later runs need no root)"
  fi
}

# Run a download command; if it fails, tell a network failure (exit 75) from a real error (exit 1) by
# its message, so that the test can skip on the former and fail on the latter.
fetch() {
  local errlog rc=0
  errlog="$(mktemp)"
  "$@" 2>"$errlog" || rc=$?
  cat "$errlog" >&2
  if [[ $rc -ne 0 ]]; then
    if grep -qiE 'Temporary failure (in name )?resolv|Could not resolve|Failed to establish a new connection|Network is unreachable|Connection (timed out|refused|reset)|No route to host|NewConnectionError|ConnectTimeout|ReadTimeout|Unable to connect|Cannot initiate the connection' "$errlog"; then
      rm -f "$errlog"
      printf 'build_sysroot: network unavailable while running: %s\n' "$*" >&2
      exit "$EX_NONET"
    fi
    rm -f "$errlog"
    die "command failed (exit $rc): $*"
  fi
  rm -f "$errlog"
}

# ------------------------------------------------------------------------------------------- sanity
[[ -x "$VENV_PY" ]] || die "no Python at $VENV_PY (create the venv with 'make install', or set EDGE_QMUL_PYTHON)"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd -P)"
case "$CACHE/" in
  "$(cd "$REPO" && pwd -P)"/*) die "cache $CACHE is inside the repository $REPO: choose a directory outside it" ;;
esac

# One build at a time per cache (two pytest sessions could start it together).
exec 9>"$CACHE/.lock"
flock 9

export DEBIAN_FRONTEND=noninteractive

# --------------------------------------------------------------------------------- 1. qemu-user-static
# The user-mode emulator runs one aarch64 process on this x86 host, no VM or kernel needed.
APT_UPDATED=0
if ! command -v qemu-aarch64-static >/dev/null; then
  log "installing qemu-user-static"
  fetch as_root apt-get update -qq
  APT_UPDATED=1
  fetch as_root apt-get install -y -qq --no-install-recommends qemu-user-static
fi

# ----------------------------------------------------------------------------- 2. the aarch64 sysroot
SYSROOT="$CACHE/sysroot"
DEBS="$CACHE/debs"
# The stamp lists the .deb files the sysroot was unpacked from: same list, nothing to do.
want_stamp="$(printf '%s\n' "${PACKAGES[@]}")"
have_stamp=""
[[ -f "$SYSROOT/.packages" ]] && have_stamp="$(cut -d' ' -f1 "$SYSROOT/.packages")"
if [[ "$want_stamp" != "$have_stamp" ]]; then
  # apt can only download arm64 packages once dpkg knows the architecture and apt has its lists.
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    log "adding the arm64 architecture to dpkg"
    as_root dpkg --add-architecture arm64
    APT_UPDATED=0
  fi
  if ! apt-cache show libc6:arm64 >/dev/null 2>&1 && [[ $APT_UPDATED -eq 0 ]]; then
    log "apt-get update (fetching the arm64 package lists)"
    fetch as_root apt-get update -qq
  fi
  apt-cache show libc6:arm64 >/dev/null 2>&1 || die "apt has no arm64 packages even after apt-get update"

  mkdir -p "$DEBS"
  for pkg in "${PACKAGES[@]}"; do
    # Already downloaded (any version): keep it, so a rerun works offline.
    compgen -G "$DEBS/${pkg}_*_arm64.deb" >/dev/null && continue
    log "downloading $pkg:arm64"
    # apt-get download writes into the current directory. As root, tell apt not to drop to the _apt
    # user, who could not write into $DEBS (apt would warn and fall back to exactly this).
    (cd "$DEBS" && fetch apt-get download -qq -o APT::Sandbox::User=root "$pkg:arm64")
    compgen -G "$DEBS/${pkg}_*_arm64.deb" >/dev/null || die "apt-get download $pkg:arm64 produced no .deb"
  done

  # Unpack into a fresh directory and swap it in, so an interrupted build never looks complete.
  log "unpacking ${#PACKAGES[@]} packages into $SYSROOT"
  rm -rf "$SYSROOT.tmp"
  mkdir -p "$SYSROOT.tmp"
  stamp=""
  for pkg in "${PACKAGES[@]}"; do
    debs=("$DEBS/${pkg}"_*_arm64.deb)
    deb="$(printf '%s\n' "${debs[@]}" | sort -V | tail -n1)"  # the newest, if apt served several
    dpkg -x "$deb" "$SYSROOT.tmp"
    stamp+="$pkg $(basename "$deb")"$'\n'
  done
  [[ -x "$SYSROOT.tmp/usr/bin/python3.11" ]] || die "no usr/bin/python3.11 in the unpacked sysroot"
  [[ -e "$SYSROOT.tmp/lib/ld-linux-aarch64.so.1" ]] || die "no aarch64 dynamic loader in the unpacked sysroot"
  printf '%s' "$stamp" >"$SYSROOT.tmp/.packages"
  rm -rf "$SYSROOT"
  mv "$SYSROOT.tmp" "$SYSROOT"
fi

# ------------------------------------------------------------------------------------------ 3. wheels
# The same onnxruntime and numpy as the x86 reference (.venv), plus onnxruntime's own run-time
# requirements at the venv's versions, all pinned, so the cache does not drift with PyPI.
REQS="$("$VENV_PY" - <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement  # pip's own vendored copy is not public; packaging is in .venv

names = ["onnxruntime", "numpy"]
names += [r.name for r in map(Requirement, md.requires("onnxruntime") or []) if r.marker is None]
seen = []
for name in names:
    if name.lower() not in (n.lower() for n in seen):
        seen.append(name)
print(" ".join(f"{n}=={md.version(n)}" for n in seen))
EOF
)" || die "cannot read the package versions from $VENV_PY"
read -ra REQ_LIST <<<"$REQS"
SITE="$CACHE/site"
WHEELS="$CACHE/wheels"
if [[ ! -f "$SITE/.requirements" || "$(cat "$SITE/.requirements")" != "$REQS" ]]; then
  log "downloading aarch64 wheels: $REQS"
  mkdir -p "$WHEELS"
  # --no-deps: every requirement is listed and pinned above. pip reuses wheels already in $WHEELS.
  fetch "$VENV_PY" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --dest "$WHEELS" "${REQ_LIST[@]}"
  rm -rf "$SITE.tmp"
  mkdir -p "$SITE.tmp"
  for req in "${REQ_LIST[@]}"; do
    # Wheel file names normalise the project name (lower case, '-' -> '_').
    name="$(printf '%s' "${req%%==*}" | tr 'A-Z-' 'a-z_')"
    whls=("$WHEELS/${name}-${req##*==}-"*.whl)
    [[ -f "${whls[0]}" ]] || die "no wheel for $req in $WHEELS"
    # A wheel is a zip archive laid out as site-packages: unzipping it is installing it.
    "$VENV_PY" -m zipfile -e "${whls[0]}" "$SITE.tmp"
  done
  # zipfile drops the mode bits; bundled executables in *.libs are only dlopen'ed, but be tidy.
  find "$SITE.tmp" -name '*.so*' -exec chmod 0755 {} +
  printf '%s' "$REQS" >"$SITE.tmp/.requirements"
  rm -rf "$SITE"
  mv "$SITE.tmp" "$SITE"
fi

# ----------------------------------------------------------------------------------------- 4. cpuinfo
# onnxruntime's CPU detection (pytorch/cpuinfo) parses /proc/cpuinfo, and with the host's x86 text it
# crashes under emulation. This is what a Raspberry Pi 4 (4 x Cortex-A72, ARMv8.0-A) reports on a
# 64-bit kernel: implementer 0x41 = Arm, part 0xd08 = Cortex-A72.
{
  for cpu in 0 1 2 3; do
    printf 'processor\t: %d\n' "$cpu"
    printf 'BogoMIPS\t: 108.00\n'
    printf 'Features\t: fp asimd evtstrm crc32 cpuid\n'
    printf 'CPU implementer\t: 0x41\n'
    printf 'CPU architecture: 8\n'
    printf 'CPU variant\t: 0x0\n'
    printf 'CPU part\t: 0xd08\n'
    printf 'CPU revision\t: 3\n\n'
  done
} >"$CACHE/cpuinfo.tmp"
mv "$CACHE/cpuinfo.tmp" "$CACHE/cpuinfo"

# -------------------------------------------------------------------------------------------- 5. READY
python_deb="$(grep '^python3.11-minimal ' "$SYSROOT/.packages" | cut -d' ' -f2)"
{
  printf 'python3.11 %s\n' "$python_deb"
  printf '%s\n' "${REQ_LIST[@]}"
  printf 'qemu %s\n' "$(qemu-aarch64-static --version | head -n1)"
} >"$CACHE/READY.tmp"
mv "$CACHE/READY.tmp" "$CACHE/READY"
log "ready: $CACHE"
cat "$CACHE/READY" >&2
