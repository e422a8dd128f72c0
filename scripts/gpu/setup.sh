#!/usr/bin/env bash
# Prepare the offline H200 machine for sdbatch. Run ON the H200, with `.whl` carried (see fetch-wheels.sh):
#
#     source scripts/gpu/setup.sh        # keeps PYTHONPATH in your shell (what you want in a `run` command)
#     scripts/gpu/setup.sh               # same work, but PYTHONPATH dies with the script
#
#   e.g. run(command='source scripts/gpu/setup.sh || exit 1; python3 -m sdbatch ...', carry=['.whl'])
#
# Steps: 1. pip install the pure-python wheels of .whl/ into $SITE (--no-index --no-deps --upgrade --target)
#        2. export PYTHONPATH=$SITE:<repo root>
#        3. build xformers from .whl/xformers-*.tar.gz against the torch there (~60-70 s on 16 cores), unless
#           $SITE already holds an xformers whose xformers.ops.fmha.common._built_with_cuda is True
#           To skip the build on a later machine (72 s on an H100's 16 cores): pack the built package there,
#             tar czf $OUT/xformers-site.tgz -C $SDBATCH_SITE xformers xformers-0.0.35.dist-info   (3.7 MB)
#           keep it in a carried, git-ignored folder, and unpack it before sourcing this script:
#             mkdir -p $SDBATCH_SITE && tar xzf .gpu/xformers-site.tgz -C $SDBATCH_SITE
#           It fits only the torch it was built against: under another, xformers warns on import that its
#           C++/CUDA extensions were built for another PyTorch, and its operators are missing from the CHECK line.
#        3b. build FlashAttention-3 (xformers' flash3 operator) with scripts/gpu/fa3.sh, ~2 min, where
#           .whl/flash-attention-*.tar.gz was carried (fa3.sh pack) and $SITE has no flash_attn_3 yet
#        4. print one check line: torch, GPU, diffusers, xformers (+ _built_with_cuda), available
#           memory_efficient_attention ops.
# Stops at the first failure with a message beginning "setup.sh: ERROR"; when sourced it returns non-zero
# instead of exiting, so your shell survives.  Does not change your shell options or working directory.
#
# Env:
#   SDBATCH_SITE        install target            (default /tmp/sdbatch-site)
#   SDBATCH_BUILD       xformers build dir + log  (default /tmp/sdbatch-xformers-build)
#   SDBATCH_SKIP_BUILD  1 = never build xformers: dry mode for a CPU machine (xformers then comes from
#                       wherever python finds it, and _built_with_cuda False is not an error)
#   SDBATCH_FORCE_BUILD 1 = rebuild xformers even if the site already has a CUDA build
#   SDBATCH_MAX_JOBS    parallel compile jobs      (default 14)
#   PYTHON              interpreter                (default python3)

_sdbatch_setup() {
  local py=${PYTHON:-python3}
  local root site build whl xf_tar
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd) || { echo "setup.sh: ERROR: cannot find the repo root" >&2; return 1; }
  site=${SDBATCH_SITE:-/tmp/sdbatch-site}
  build=${SDBATCH_BUILD:-/tmp/sdbatch-xformers-build}
  whl=$root/.whl

  _sdbatch_die() { echo "setup.sh: ERROR: $*" >&2; return 1; }

  # --- 0. inputs
  command -v "$py" >/dev/null 2>&1 || { _sdbatch_die "no $py on PATH"; return 1; }
  [[ -d $whl ]] || { _sdbatch_die "$whl missing: run scripts/gpu/fetch-wheels.sh on the CPU machine and carry .whl"; return 1; }
  local wheels=("$whl"/*.whl)
  [[ -e ${wheels[0]} ]] || { _sdbatch_die "no wheels in $whl: run scripts/gpu/fetch-wheels.sh"; return 1; }
  local dups
  dups=$(for f in "${wheels[@]}"; do basename "$f" | sed -E 's/-[0-9].*$//' | tr '[:upper:]' '[:lower:]'; done | sort | uniq -d)
  [[ -z $dups ]] || { _sdbatch_die "two versions of $dups in $whl: keep one"; return 1; }
  mkdir -p "$site" || { _sdbatch_die "cannot create $site"; return 1; }

  # --- 1. pure-python wheels
  echo "setup.sh: installing ${#wheels[@]} wheels from $whl into $site"
  PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
    || { _sdbatch_die "pip install of $whl/*.whl into $site failed"; return 1; }

  # --- 2. environment
  export PYTHONPATH=$site:$root
  echo "setup.sh: PYTHONPATH=$PYTHONPATH"

  # --- 3. xformers
  local have_cuda_xf=0
  if "$py" -c 'import sys, xformers.ops.fmha.common as c; sys.exit(0 if c._built_with_cuda else 1)' >/dev/null 2>&1 \
     && [[ -d $site/xformers ]]; then
    have_cuda_xf=1
  fi
  if [[ ${SDBATCH_SKIP_BUILD:-0} == 1 ]]; then
    echo "setup.sh: SDBATCH_SKIP_BUILD=1: not building xformers (dry mode)"
  elif [[ $have_cuda_xf == 1 && ${SDBATCH_FORCE_BUILD:-0} != 1 ]]; then
    echo "setup.sh: $site already has a CUDA build of xformers: build skipped"
  else
    local tars=("$whl"/xformers-*.tar.gz)
    xf_tar=${tars[0]}
    [[ -e $xf_tar ]] || { _sdbatch_die "no xformers source tarball in $whl: run scripts/gpu/fetch-wheels.sh"; return 1; }
    "$py" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' \
      || { _sdbatch_die "$py's torch has no CUDA: cannot build xformers here (use SDBATCH_SKIP_BUILD=1 for a dry run)"; return 1; }
    command -v nvcc >/dev/null 2>&1 || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]] \
      || { _sdbatch_die "nvcc not found (PATH or \$CUDA_HOME/bin): cannot build xformers"; return 1; }
    local src ver log t0 t1
    src=$(basename "$xf_tar" .tar.gz)          # xformers-0.0.35
    ver=${src#xformers-}
    log=$build/build.log
    [[ -n $build && $build != / ]] || { _sdbatch_die "refusing SDBATCH_BUILD='$build'"; return 1; }
    { rm -rf "$build" && mkdir -p "$build/wheel"; } || { _sdbatch_die "cannot create $build"; return 1; }
    tar xzf "$xf_tar" -C "$build" || { _sdbatch_die "cannot unpack $xf_tar"; return 1; }
    echo "setup.sh: building $src (TORCH_CUDA_ARCH_LIST=9.0, flash-attn off, MAX_JOBS=${SDBATCH_MAX_JOBS:-14}); log: $log"
    t0=$(date +%s)
    # subshell: the cd and the build variables stay out of the caller's shell
    if ! (cd "$build/$src" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${SDBATCH_MAX_JOBS:-14} XFORMERS_DISABLE_FLASH_ATTN=1 \
          BUILD_VERSION=$ver "$py" -m pip wheel --no-deps --no-build-isolation --no-cache-dir -w "$build/wheel" . ) >"$log" 2>&1; then
      tail -n 40 "$log" >&2
      _sdbatch_die "xformers build failed after $(( $(date +%s) - t0 )) s (full log: $log)"; return 1
    fi
    t1=$(date +%s)
    echo "setup.sh: xformers $ver built in $((t1 - t0)) s" | tee -a "$log"
    local built=("$build"/wheel/xformers-*.whl)
    [[ -e ${built[0]} ]] || { _sdbatch_die "the build made no wheel (log: $log)"; return 1; }
    PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$site" "${built[0]}" \
      || { _sdbatch_die "pip install of ${built[0]} into $site failed"; return 1; }
  fi

  # --- 3b. FlashAttention-3 for xformers' flash3 operator, where its sources were carried (scripts/gpu/fa3.sh pack)
  local fa_tars=("$whl"/flash-attention-*.tar.gz)
  if [[ -e ${fa_tars[0]} && ${SDBATCH_SKIP_BUILD:-0} != 1 ]] \
     && ! "$py" -c 'import torch, flash_attn_3._C' >/dev/null 2>&1; then
    SDBATCH_SITE=$site PYTHON=$py "$root/scripts/gpu/fa3.sh" build \
      || { _sdbatch_die "the FlashAttention-3 build failed (see above)"; return 1; }
  fi

  # --- 4. check line
  local check
  check=$("$py" - <<'PY' 2>&1
import io, contextlib, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
try:
    import diffusers; dv = diffusers.__version__
except Exception as e:  # noqa: BLE001
    dv = f"IMPORT FAILED ({type(e).__name__}: {e})"
try:
    import xformers, xformers.ops.fmha.common as c
    xv, built = xformers.__version__, bool(c._built_with_cuda)
    import xformers.info as xi
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        xi.print_info()
    ops = [l.split(":")[0].split(".", 1)[1] for l in buf.getvalue().splitlines()
           if l.startswith("memory_efficient_attention") and l.split()[-1] == "available"]
except Exception as e:  # noqa: BLE001
    xv, built, ops = f"IMPORT FAILED ({type(e).__name__}: {e})", False, []
print(f"torch {torch.__version__} | {dev} | diffusers {dv} | xformers {xv} _built_with_cuda={built} "
      f"| memory_efficient_attention: {','.join(ops) or 'none'}")
PY
) || { echo "$check" >&2; _sdbatch_die "the check script failed"; return 1; }
  check=$(printf '%s\n' "$check" | tail -n 1)   # xformers may warn on import; the last line is ours
  echo "setup.sh: CHECK: $check"
  [[ $check != *"IMPORT FAILED"* ]] || { _sdbatch_die "an import failed (see CHECK line)"; return 1; }
  if [[ ${SDBATCH_SKIP_BUILD:-0} != 1 && $check != *"_built_with_cuda=True"* ]]; then
    _sdbatch_die "xformers is not a CUDA build (see CHECK line); try SDBATCH_FORCE_BUILD=1"; return 1
  fi
  return 0
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then   # sourced: never exit the caller's shell
  if _sdbatch_setup; then
    unset -f _sdbatch_setup _sdbatch_die
    return 0
  else
    unset -f _sdbatch_setup _sdbatch_die
    return 1
  fi
else
  _sdbatch_setup || exit 1
  echo "setup.sh: note: executed, not sourced: run   export PYTHONPATH=$PYTHONPATH   in your shell"
fi
