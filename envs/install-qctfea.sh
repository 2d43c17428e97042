#!/usr/bin/env bash
# Installs qctfea (editable, no dependencies: the conda env provides them) into the active
# conda environment. Called by envs/*.post-deploy.sh, which Snakemake runs from its working
# directory: the repository root when run as documented; otherwise set QCTFEA_SRC=<checkout>.
#   --dolfinx-shim  also add a `dolfinx_solver` module: the pip wheel dolfinx-solver-real ships
#                   one that imports mpi4py.MPI before the compiled bindings, and qctfea.fea
#                   imports it; conda-forge's fenics-dolfinx needs no bootstrap, so the shim
#                   only does that import.
set -euo pipefail
src=${QCTFEA_SRC:-$PWD}
if ! grep -qs '^name = "qctfea"' "$src/pyproject.toml"; then
  echo "install-qctfea: no qctfea checkout at $src; run snakemake from the repository root" \
       "or set QCTFEA_SRC=/path/to/qctfea" >&2
  exit 1
fi
python -m pip install --quiet --no-deps --no-build-isolation -e "$src"
if [ "${1:-}" = "--dolfinx-shim" ] && ! python -c "import dolfinx_solver" 2>/dev/null; then
  site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  mkdir -p "$site/dolfinx_solver"
  cat > "$site/dolfinx_solver/__init__.py" <<'PY'
"""Import shim written by qctfea's envs/install-qctfea.sh for conda-forge DOLFINx: the
dolfinx-solver-real wheel's module of this name imports mpi4py.MPI before the compiled
bindings; conda-forge's build needs nothing more."""
from mpi4py import MPI  # noqa: F401

__version__ = "conda-forge-shim"
PY
fi
python -c "import qctfea; print('[env] qctfea', qctfea.__version__, 'installed from $src')"
