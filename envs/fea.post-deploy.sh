#!/usr/bin/env bash
# Run by Snakemake once, inside the freshly built conda env: install qctfea from this checkout
# and the dolfinx_solver import shim (conda-forge's DOLFINx has no such module).
exec bash "${QCTFEA_SRC:-$PWD}/envs/install-qctfea.sh" --dolfinx-shim
