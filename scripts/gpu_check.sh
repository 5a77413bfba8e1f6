#!/usr/bin/env bash
# Check Ava on a lent GPU in one call (issue 22, item 7): the environment, Ava's dependencies from
# wheels, the CUDA-relevant tests, and short bf16 and fp8 training runs of a 0.4B dense model and
# base.yaml's MoE at 4 layers with tokens/s and MFU. The stages, their timeouts and the JSON are
# `python -m benchmarks.gpu_check`'s; this script picks the interpreter and fetches the wheels.
#
# The device machine (one H100, 16 cores) has CUDA PyTorch but no network, and lacks DeepSpeed,
# torchao, pydantic and datasets. On the day one is lent:
#   1. here, with network:  scripts/gpu_check.sh --fetch-wheels --python-version 3.12
#      (the image's python3 was 3.12.3 when last read; the wheels land in .gpu_wheels/, ignored by git)
#   2. the device tool:     run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=570)
#      gpu_check.json and gpu_check.log come back from $OUT; the table is the end of the output.
#      Stages share --budget (default 480 s), so the command ends inside the 10-minute limit.
# Here, without a GPU:      scripts/gpu_check.sh --dry-run   (CPU stand-ins, under a minute; the test runs it)
#
# --fetch-wheels runs, for each package at the version this checkout's .venv has (so the GPU runs
# what was tested here):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       (... manylinux_2_24/2_27/2_31/2_34/2_35/2_39, manylinux1) -d .gpu_wheels NAME==VERSION
# and builds DeepSpeed's wheel, since PyPI has only its sdist:
#   DS_BUILD_OPS=0 python -m pip wheel --no-deps --no-build-isolation -w .gpu_wheels deepspeed==VERSION
# With DS_BUILD_OPS=0 the wheel is pure Python (py3-none-any) and builds its ops (FusedAdam) with
# the GPU machine's nvcc on first use; the deepspeed_ops stage does that once for the runs.
# torch is never fetched: the image's CUDA build is the one used.
#
# Usage: scripts/gpu_check.sh [--dry-run] [--wheels DIR] [benchmarks.gpu_check options: --budget S --only a,b
#                             --steps N --json PATH --peak-tflops BF16[,FP8] --train-arg ARG ...]
#        scripts/gpu_check.sh --fetch-wheels [--python-version 3.12] [--wheels DIR] [--extra NAME==VERSION]...
#   PYTHON=/path/to/python  the interpreter (default: python3 for the GPU check, .venv/bin/python for
#                           --dry-run and --fetch-wheels when it exists)
# Exit status: 0 when every stage passed (or was skipped by design), 1 when one failed, timed out or
# did not fit in the budget (the JSON is written either way), 2 for a usage error.
set -u
cd "$(dirname "$0")/.." || exit 2

# Ava's dependencies the GPU image lacks (KINDS.md's package list), and what they need that it lacks too.
# wandb is left out: only training.wandb_log imports it.
FETCH=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions torchao datasets dill multiprocess)
PLATFORMS=(manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64
           manylinux_2_39_x86_64 manylinux1_x86_64)
CARRY_LIMIT_MIB=64

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

mode=check dry=0 pyver=3.12 wheels=.gpu_wheels
extra=() pass=()
while (($#)); do
  case "$1" in
    --dry-run) dry=1; pass+=("$1") ;;
    --fetch-wheels) mode=fetch ;;
    --python-version) (($# > 1)) || die "--python-version needs a value, e.g. 3.12"; pyver=$2; shift ;;
    --python-version=*) pyver=${1#*=} ;;
    --wheels) (($# > 1)) || die "--wheels needs a folder"; wheels=$2; pass+=(--wheels "$2"); shift ;;
    --wheels=*) wheels=${1#*=}; pass+=("$1") ;;
    --extra) (($# > 1)) || die "--extra needs NAME==VERSION"; extra+=("$2"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) pass+=("$1") ;;
  esac
  shift
done
[[ $pyver =~ ^3\.[0-9]+$ ]] || die "--python-version '$pyver' is not of the form 3.N (e.g. 3.12)"

if [[ -n ${PYTHON:-} ]]; then py=$PYTHON
elif [[ ($mode == fetch || $dry == 1) && -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
command -v "$py" >/dev/null 2>&1 || die "Python interpreter '$py' not found; set PYTHON=/path/to/python"

fetch_wheels() {
  mkdir -p "$wheels" || die "cannot create $wheels"
  # name==version as this interpreter has it (the bare name, so the newest, where it has none);
  # an --extra of the same name replaces it. DeepSpeed's comes last.
  local -a pins
  mapfile -t pins < <("$py" - "${FETCH[@]}" deepspeed -- "${extra[@]}" <<'EOF'
import re, sys
from importlib import metadata
args = sys.argv[1:]
names, extras = args[:args.index("--")], args[args.index("--") + 1:]
key = lambda spec: re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ ]", spec, maxsplit=1)[0]).lower()
chosen = {key(e): e for e in extras}
for name in names:
    if key(name) not in chosen:
        try:
            chosen[key(name)] = f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            chosen[key(name)] = name
ds = chosen.pop("deepspeed")
print(*chosen.values(), ds, sep="\n")
EOF
  )
  local ds_pin=${pins[-1]} failed=() pin plat_args=()
  unset 'pins[-1]'
  for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
  echo "gpu_check: fetching wheels for CPython $pyver (linux x86_64) into $wheels with $py"
  for pin in "${pins[@]}"; do
    echo "  $pin"
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version "$pyver" --implementation cp "${plat_args[@]}" -d "$wheels" "$pin" || failed+=("$pin")
  done
  echo "  $ds_pin (built here: PyPI has only the sdist; DS_BUILD_OPS=0, pure Python)"
  # --no-cache-dir: a wheel cached from a build with ops would not be pure Python
  DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --no-build-isolation -w "$wheels" "$ds_pin" || failed+=("$ds_pin")
  echo "gpu_check: $wheels now holds:"
  ls -l "$wheels"/*.whl 2>/dev/null | awk '{printf "  %8.1f MiB  %s\n", $5 / 1048576, $NF}'
  local total
  total=$(du -sm "$wheels" | cut -f1)
  echo "gpu_check: $total MiB in all (carry limit for the whole tree: $CARRY_LIMIT_MIB MiB)"
  ((total < CARRY_LIMIT_MIB - 8)) || echo "gpu_check: WARNING: too large to carry with the tree; keep one Python version's wheels" >&2
  if ((${#failed[@]})); then
    echo "gpu_check: could not fetch: ${failed[*]} (network? a version with no wheel for $pyver? try --extra NAME==VERSION)" >&2
    return 1
  fi
  echo "gpu_check: next: run(command=\"bash scripts/gpu_check.sh\", carry=[\"$wheels\"], timeout_s=570)"
}

if [[ $mode == fetch ]]; then
  fetch_wheels
  exit $?
fi
((dry)) && export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec "$py" -m benchmarks.gpu_check "${pass[@]}"
