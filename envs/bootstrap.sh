#!/usr/bin/env bash
# Build the project's environment in .venv (idempotent; prints what it does).
#  1. Debian packages needed to build pygalmesh (libcgal-dev, libeigen3-dev).
#  2. A Python >= 3.12 interpreter (DOLFINx's wheel needs it).
#  3. .venv with the pinned requirements and qctfea installed in editable mode.
# Re-running does nothing when requirements.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
say() { printf '[env] %s\n' "$*"; }

need_apt=()
for pkg in libcgal-dev libeigen3-dev g++ make; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
    say "missing Debian packages: ${need_apt[*]}; install them (as root) and re-run"; exit 1
  fi
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  say "installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
else
  say "Debian packages present (libcgal-dev, libeigen3-dev)"
fi

find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[3-9]*/bin/python3 \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 \
           /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

stamp="$VENV/.qctfea-env-$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ -x "$VENV/bin/python" ]; then
  say "environment up to date ($VENV)"; exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python) || { say "no Python >= 3.12 found; set PYTHON=/path/to/python3.12"; exit 1; }
  say "creating $VENV with $PY ($("$PY" --version))"
  "$PY" -m venv "$VENV"
fi
say "installing pinned requirements (pygalmesh compiles against CGAL: about 5 minutes the first time)"
quiet() { grep -v -e "^WARNING: Location" -e "^$" || true; }
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
"$VENV/bin/python" -m pip install -q -r requirements.txt 2>&1 | quiet
"$VENV/bin/python" -m pip install -q --no-deps -e . 2>&1 | quiet
"$VENV/bin/python" -c 'import dolfinx_solver, dolfinx, pygalmesh, snakemake; print("[env] dolfinx", dolfinx.__version__, "| pygalmesh", pygalmesh.__version__)'
rm -f "$VENV"/.qctfea-env-*
touch "$stamp"
say "environment ready ($VENV)"
