#!/usr/bin/env bash
# Fetch what the offline H200 machine lacks into .whl/ (git-ignored), for `carry: [".whl"]`.
#
# Run HERE (a machine with network and torch installed), from anywhere in the repo:
#     scripts/gpu/fetch-wheels.sh
# Then on the H200:  source scripts/gpu/setup.sh
#
# What and why (see ../shared/GPU.md and the device KINDS.md package list):
#   diffusers==0.42.1          needs importlib_metadata, filelock, huggingface-hub>=1.32,<3, numpy, regex,
#                              requests, safetensors>=0.8, Pillow: all on the H200 except importlib_metadata
#   importlib_metadata         needs zipp>=3.20 (there) and lazy-importer>=0.1 (NOT there -> fetched too)
#   lazy-importer              no requirements
#   hydra-core==1.3.8          needs omegaconf, antlr4-python3-runtime==4.9.*, packaging (there)
#   omegaconf==2.3.0           needs antlr4-python3-runtime==4.9.*, PyYAML (there)
#   antlr4-python3-runtime==4.9.3   only an sdist on PyPI: built here into a pure-python wheel
#   xformers==0.0.35           the SOURCE tarball: the PyPI wheel is built for another torch, so
#                              setup.sh compiles it on the H200 against the torch there
# All wheels are py3-none-any, so the Python version here does not matter.
# FlashAttention-3 (xformers' flash3 operator) comes as sources too, from two git mirrors rather than a registry:
# scripts/gpu/fa3.sh pack FLASH_ATTENTION_REPO CUTLASS_REPO adds .whl/flash-attention-<commit>.tar.gz (2.7 MB).
#
# Idempotent: a package whose file is already in .whl/ (any version) is skipped; delete the file to refetch.
# Env: PYTHON (default python3), WHL_DIR (default <repo>/.whl).
set -euo pipefail

PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${WHL_DIR:-$ROOT/.whl}
mkdir -p "$DEST"

# Pinned so that the set stays one version of each and its requirements stay as checked above.
PURE_WHEELS=(
  "diffusers==0.42.1"
  "hydra-core==1.3.8"
  "omegaconf==2.3.0"
  "importlib_metadata==10.2.0"
  "lazy-importer==0.1.0"
  "peft==0.21.2"
)
ANTLR="antlr4-python3-runtime==4.9.3"
XFORMERS="xformers==0.0.35"

# "hydra-core==1.3.8" -> "hydra_core": the file-name prefix of its wheel / sdist (PEP 427/625 normalisation).
file_prefix() {
  local name=${1%%[=<>!~]*}
  name=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | tr -s '.-' '__')
  printf '%s' "$name"
}

have() {  # have PREFIX EXT: a file PREFIX-*.EXT exists in DEST (case-insensitive)
  local f base
  for f in "$DEST"/*."$2"; do
    [[ -e $f ]] || continue
    base=$(basename "$f" | tr '[:upper:]' '[:lower:]')
    [[ $base == "$1"-* ]] && return 0
  done
  return 1
}

PIP_PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

for req in "${PURE_WHEELS[@]}"; do
  if have "$(file_prefix "$req")" whl; then
    echo "skip  $req (already in $DEST)"
  else
    echo "fetch $req"
    "$PY" -m pip download -q --no-deps "${PIP_PLATFORM[@]}" -d "$DEST" "$req"
  fi
done

if have "$(file_prefix "$ANTLR")" whl; then
  echo "skip  $ANTLR (already in $DEST)"
else
  echo "build $ANTLR (sdist only on PyPI -> pure-python wheel)"
  "$PY" -m pip wheel -q --no-deps -w "$DEST" "$ANTLR"
fi

if have "$(file_prefix "$XFORMERS")" tar.gz; then
  echo "skip  $XFORMERS source (already in $DEST)"
else
  echo "fetch $XFORMERS source tarball (needs torch importable here for its metadata step)"
  "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$DEST" "$XFORMERS"
fi

# Sanity: every wheel pure python, one version per distribution, total size.
fail=0
for f in "$DEST"/*.whl; do
  [[ $f == *-py3-none-any.whl || $f == *-py2.py3-none-any.whl ]] || { echo "ERROR: not a pure-python wheel: $f" >&2; fail=1; }
done
dups=$(for f in "$DEST"/*.whl "$DEST"/*.tar.gz; do [[ -e $f ]] && basename "$f" | sed -E 's/-[0-9].*$//' | tr '[:upper:]' '[:lower:]'; done | sort | uniq -d)
if [[ -n $dups ]]; then
  echo "ERROR: more than one version of: $dups (remove the extra files from $DEST)" >&2
  fail=1
fi
echo "--- $DEST:"
ls -l "$DEST"
kb=$(du -sk "$DEST" | cut -f1)
echo "total: $((kb / 1024)) MiB ($kb KiB)"
if ((kb > 20 * 1024)); then
  echo "ERROR: $DEST is over 20 MiB; it travels with every run that carries it" >&2
  fail=1
fi
exit $fail
