#!/usr/bin/env bash
# One command that measures ensattr_fast on a fresh GPU machine, in under 8 minutes:
#
#   benchmarks/device_check.sh [FOLDER] [--dry-run]
#
# It builds the extension in place against the torch that is installed (no package registry
# needed: nothing is downloaded; MAX_JOBS=16, sm_90 unless TORCH_CUDA_ARCH_LIST says
# otherwise), then runs the op tests (CUDA cases included), the fused ops' benchmarks with
# their copy-bandwidth ratios, and the hardware figures: UNet-ensemble training throughput
# (batched vs one by one, fp32 vs bf16, seed-cifar10 a few members per pass) and sampling and
# ablation throughput; those stages are `python -m benchmarks.device.device_check` (the code:
# benchmarks/device/). It writes device_check.json and device_check.log into FOLDER ($OUT, or
# out/device_check). --dry-run does all of it on the CPU at the smallest sizes (CI runs it so
# that the script cannot rot); it reuses an extension that is already built. Wheels of missing
# packages (diffusers: `pip download --no-deps ... -d .whl diffusers importlib_metadata`) are
# used from .whl/ when it exists.
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

dry_run=0
folder=${OUT:-out/device_check}
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,16p' "$self"; exit 0 ;;
    *) folder=$arg ;;
  esac
done
mkdir -p "$folder"
exec > >(tee "$folder/device_check.log") 2>&1
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
echo "== $(date +%T) device check in $(pwd), results in $folder (dry run: $dry_run)"

# Python packages the machine lacks (diffusers, for seed-cifar10) travel as wheels in .whl/
# (no registry there): unpacked into a private folder, never into the machine's environment.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-check-site .whl/*.whl \
    && export PYTHONPATH=/tmp/device-check-site${PYTHONPATH:+:$PYTHONPATH} && echo "== wheels from .whl/: $(ls .whl | tr '\n' ' ')"
fi

if [ "$dry_run" = 1 ] && "$python" -c "import ensattr_fast._C" 2>/dev/null; then
  echo "== dry run: the extension is already built"
else
  echo "== $(date +%T) building the extension in place"
  if [ "$dry_run" = 1 ]; then
    export FORCE_ONLY_CPU=1 MAX_JOBS=${MAX_JOBS:-2}
  else
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
      top=$(nvcc --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
      [ -n "$top" ] && export CUDA_HOME=$(cd "$top" && pwd)
    fi
    export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  fi
  started=$SECONDS
  "$python" setup.py -q build_ext --inplace || { echo "device check: the build failed"; exit 1; }
  echo "== built in $((SECONDS - started)) s"
  export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
fi

args=(--out "$folder")
[ "$dry_run" = 1 ] && args+=(--dry-run)
"$python" -m benchmarks.device.device_check "${args[@]}"
