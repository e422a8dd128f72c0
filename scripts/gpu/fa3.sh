#!/usr/bin/env bash
# FlashAttention-3 for xformers' `flash3` operator (attention=xformers on Hopper), built on the offline GPU machine.
#
# xformers 0.0.35 does not compile FA3 itself: its flash3 operator loads a separately installed `flash_attn_3`
# package (flash-attention's hopper/ build) whose `flash_attn_3::fwd` schema matches the one it expects. This script
# builds only what sdbatch runs: the sm90 forward kernels, fp16 and bf16, at the head widths in FA3_HDIMS (default
# "64 96 192": FA3 pads a head up to the next width it has, so SDXL's and SD2's 64-wide heads and SD1.5's 40-, 80-
# and 160-wide ones all run; sdbatch keeps a head wider than the build's widest off it, where it would
# crash). No backward, split-KV, paged KV, local, softcap or varlen, and no fp8 unless FA3_FP8=1 (e4m3 kernels at
# the same widths, for scripts/gpu/fa3_fp8_probe.py).
#
#   scripts/gpu/fa3.sh pack FA_REPO CUTLASS_REPO   HERE: write .whl/flash-attention-<commit>.tar.gz (hopper/ and the
#                                                   CUTLASS headers flash-attention pins, ~3 MB) from two git
#                                                   checkouts or mirrors (the `fetch` tool brings both)
#   scripts/gpu/fa3.sh build                        THERE, after `source scripts/gpu/setup.sh`: build the wheel from
#                                                   that tarball and install it into $SDBATCH_SITE
# Env: SDBATCH_SITE (default /tmp/sdbatch-site), SDBATCH_BUILD (default /tmp/sdbatch-fa3-build), FA3_HDIMS, FA3_FP8,
# SDBATCH_MAX_JOBS (default 16), FA3_WHEEL_COPY (a folder to copy the built wheel to, e.g. $OUT).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
die() { echo "fa3.sh: ERROR: $*" >&2; exit 1; }

pack() {
  local fa=$1 cutlass=$2 commit pin tmp
  commit=$(git -C "$fa" rev-parse --short=12 HEAD) || die "$fa is not a git checkout of flash-attention"
  pin=$(git -C "$fa" ls-tree HEAD csrc/cutlass | awk '{print $3}')
  [[ -n $pin ]] || die "$fa has no csrc/cutlass submodule entry"
  tmp=$(mktemp -d)
  mkdir -p "$tmp/flash-attention/csrc/cutlass" "$ROOT/.whl"
  git -C "$fa" archive HEAD hopper README.md | tar x -C "$tmp/flash-attention"  # setup.py reads ../README.md
  git -C "$cutlass" archive "$pin" include | tar x -C "$tmp/flash-attention/csrc/cutlass" \
    || die "$cutlass lacks commit $pin, which flash-attention $commit pins"
  tar czf "$ROOT/.whl/flash-attention-$commit.tar.gz" -C "$tmp" flash-attention
  rm -rf "$tmp"
  echo "fa3.sh: wrote .whl/flash-attention-$commit.tar.gz (flash-attention $commit, CUTLASS $pin)"
}

build() {
  local site=${SDBATCH_SITE:-/tmp/sdbatch-site} build=${SDBATCH_BUILD:-/tmp/sdbatch-fa3-build} tars src t0 hdim
  tars=("$ROOT"/.whl/flash-attention-*.tar.gz)
  [[ -e ${tars[0]} ]] || die "no .whl/flash-attention-*.tar.gz: run 'scripts/gpu/fa3.sh pack' on the CPU machine"
  command -v nvcc >/dev/null || die "no nvcc on PATH"
  [[ -n $build && $build != / ]] || die "refusing SDBATCH_BUILD='$build'"
  rm -rf "$build" && mkdir -p "$build/wheel" && tar xzf "${tars[0]}" -C "$build"
  src=$build/flash-attention/hopper
  local -a off=(BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA VARLEN SM80 CLUSTER HDIMDIFF64 HDIMDIFF192)
  [[ ${FA3_FP8:-0} == 1 ]] || off+=(FP8)
  for hdim in 64 96 128 192 256; do
    [[ " ${FA3_HDIMS:-64 96 192} " == *" $hdim "* ]] || off+=("HDIM$hdim")
  done
  # --split-compile: the few kernel files are large, so each one's optimisation runs on several cores
  local -a env=(FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=${SDBATCH_MAX_JOBS:-16} NVCC_THREADS=1
                NVCC_APPEND_FLAGS="--split-compile=${FA3_SPLIT:-8}")
  for flag in "${off[@]}"; do env+=("FLASH_ATTENTION_DISABLE_$flag=TRUE"); done
  echo "fa3.sh: building $(basename "${tars[0]}" .tar.gz), head widths ${FA3_HDIMS:-64 96 192}, fp8 ${FA3_FP8:-0}; log: $build/build.log"
  t0=$(date +%s)
  (cd "$src" && env "${env[@]}" "$PY" -m pip wheel --no-deps --no-build-isolation --no-cache-dir -w "$build/wheel" .) \
    >"$build/build.log" 2>&1 || { tail -n 40 "$build/build.log" >&2; die "build failed after $(( $(date +%s) - t0 )) s"; }
  echo "fa3.sh: built in $(( $(date +%s) - t0 )) s: $(ls "$build"/wheel)"
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$site" \
    "$build"/wheel/flash_attn_3-*.whl
  [[ -z ${FA3_WHEEL_COPY:-} ]] || cp "$build"/wheel/flash_attn_3-*.whl "$FA3_WHEEL_COPY"/
  "$PY" -c 'import xformers.ops.fmha.flash3 as f; import sys; print("fa3.sh: xformers flash3:", f.FLASH_VERSION)
sys.exit(0 if f._C_flashattention3 is not None else 1)' || die "xformers does not accept the built flash_attn_3"
}

case ${1:-} in
  pack) [[ $# == 3 ]] || die "usage: fa3.sh pack FLASH_ATTENTION_REPO CUTLASS_REPO"; pack "$2" "$3" ;;
  build) build ;;
  *) die "usage: fa3.sh pack FLASH_ATTENTION_REPO CUTLASS_REPO | fa3.sh build" ;;
esac
