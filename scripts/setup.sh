#!/usr/bin/env bash
# Set up Ava in ./.venv: one command on a fresh machine.
#
# torch is chosen before anything else can pull it in:
#   * a torch the Python already sees (system-wide, a conda env, an NGC
#     container) is kept -- the venv is created with --system-site-packages;
#   * otherwise, on a machine with an NVIDIA driver (nvidia-smi), the default
#     torch build (CUDA);
#   * otherwise the CPU build, torch==2.13.0, so a CPU machine never downloads
#     gigabytes of CUDA libraries.
# AVA_TORCH_SPEC overrides the choice (e.g. AVA_TORCH_SPEC="torch==2.13.0");
# AVA_TORCH_INDEX_URL adds an index for it (e.g. PyTorch's CPU wheel index).
#
# Usage: scripts/setup.sh [--print-torch-choice]
#   PYTHON=/path/to/python  the interpreter the venv is made from (default: python3)
#   AVA_VENV=dir             where the venv goes (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${AVA_VENV:-.venv}"
CPU_TORCH="torch==2.13.0"

torch_choice() {  # prints "keep", or the pip requirement to install
  local py="$1"
  if [[ -n "${AVA_TORCH_SPEC:-}" ]]; then echo "$AVA_TORCH_SPEC"; return; fi
  if "$py" -c "import torch" >/dev/null 2>&1; then echo keep; return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; return; fi
  echo "$CPU_TORCH"
}

if [[ "${1:-}" == "--print-torch-choice" ]]; then
  torch_choice "$PYTHON"
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup: Python interpreter '$PYTHON' not found. Install Python >= 3.10 or set PYTHON=/path/to/python." >&2
  exit 2
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV from $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"

# Skip the pip work when nothing that affects the install changed.
STAMP="$VENV/.ava-setup-stamp"
WANT="$(cat setup.cfg pyproject.toml scripts/setup.sh | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$PY" -c "import ava, torch, deepspeed" >/dev/null 2>&1; then
  echo "setup: $VENV is up to date (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
  exit 0
fi

PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
choice="$(torch_choice "$PY")"
if [[ "$choice" == keep ]]; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing $choice"
  if [[ -n "${AVA_TORCH_INDEX_URL:-}" ]]; then
    "${PIP[@]}" "$choice" --extra-index-url "$AVA_TORCH_INDEX_URL"
  else
    "${PIP[@]}" "$choice"
  fi
fi
echo "setup: installing Ava and its dependencies (editable, with dev tools)"
"${PIP[@]}" -e ".[dev]"
"$PY" -c "import ava, torch, deepspeed; print(f'setup: ok -- ava {ava.__version__}, torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep -v "^\[" || true
"$PY" -c "import ava, torch, deepspeed" >/dev/null 2>&1
echo "$WANT" > "$STAMP"
