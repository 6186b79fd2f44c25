#!/usr/bin/env bash
# Create .venv (Python 3.10/3.11) and install clinlens with its pinned set, once per pyproject change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CLINLENS_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for c in python3.11 python3.10 python3; do
      if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(not ((3,10) <= sys.version_info[:2] <= (3,11)))'; then PY=$c; break; fi
    done
  fi
  [ -n "$PY" ] || { echo "clinlens needs Python 3.10 or 3.11 (monailabel 0.8.5); set PYTHON=/path/to/python3.11" >&2; exit 1; }
  echo "[clinlens] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.clinlens-installed"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[clinlens] installing clinlens and its pinned dependencies (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import clinlens, monailabel.main, torch, torchvision, transformers" \
    || { echo "[clinlens] install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
