#!/usr/bin/env bash
# Run by Snakemake once, inside the freshly built conda env: install qctfea from this checkout.
# pydicom's decoder of compressed DICOM (python-gdcm) is a PyPI package: the pin of
# requirements.txt, so that a cluster run reads the same series as a local one.
src=${QCTFEA_SRC:-$PWD}
python -m pip install --quiet "$(grep -E '^python-gdcm==' "$src/requirements.txt")"
exec bash "${QCTFEA_SRC:-$PWD}/envs/install-qctfea.sh"
