#!/usr/bin/env bash
# Run by Snakemake once, inside the freshly built conda env: install qctfea from this checkout.
exec bash "${QCTFEA_SRC:-$PWD}/envs/install-qctfea.sh"
