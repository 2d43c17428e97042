"""Linear load cases of one finished scan under PETSc option variants: iterations and total
seconds per case (assembly, preconditioner set-up, solve), and the multigrid levels the
solve smoothed with scalar Jacobi (a singular aggregate block). Run under MPI on a scan's
results folder (mesh, materials, vertebra and screws of a workflow run):

    mpiexec -n 4 .venv/bin/python tools/solver_sweep.py results/totalseg-l1/T01/M00 \\
        '{"default": {}, "threshold 0.01": {"pc_gamg_threshold": 0.01}}'

Each variant's options go over ``DEFAULT_PETSC_OPTIONS``. Not part of the library or the
tests; the table it fed: docs/performance.md ("GAMG threshold of the linear solve").
"""
from __future__ import annotations

import argparse
import json
import time

import dolfinx_solver  # noqa: F401  (before dolfinx or petsc4py)
import numpy as np
from mpi4py import MPI

from qctfea.config import params_from
from qctfea.errors import QctfeaError
from qctfea.fea import elasticity, loadcases
from qctfea.steps import load_screws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scan", help="a scan's results folder (mesh.xdmf, materials.npz, "
                    "vertebra.json, screws.json)")
    ap.add_argument("variants", type=json.loads,
                    help='JSON object: variant name -> PETSc options, e.g. '
                    '\'{"default": {}, "threshold 0.01": {"pc_gamg_threshold": 0.01}}\'')
    args = ap.parse_args()
    scan, variants = args.scan, args.variants
    mesh, tags = elasticity.read_mesh(f"{scan}/mesh.xdmf")
    npz = np.load(f"{scan}/materials.npz")
    with open(f"{scan}/vertebra.json", encoding="utf-8") as f:
        axis = json.load(f)
    screws = {s.side: s for s in load_screws(f"{scan}/screws.json")}
    lp = params_from(loadcases.LoadParams, {"analysis": "linear"}, "loads")
    for name, options in variants.items():
        row = []
        for case in ("compression", "left", "right"):
            model = elasticity.ElasticModel(mesh, npz["youngs_mpa"], npz["poisson"])
            t0 = time.perf_counter()
            try:
                if case == "compression":
                    r = loadcases.solve_compression(model, tags, npz["tags"], axis, lp, options)
                else:
                    r = loadcases.solve_pullout(model, tags, npz["tags"], npz["centroids_mm"],
                                                axis, screws[case], lp, options)
                jacobi = r["jacobi_levels"]
                row.append(f"{case} {r['ksp_iterations']} its"
                           f"{f' jacobi levels {jacobi}' if jacobi else ''}"
                           f" {time.perf_counter() - t0:.1f} s")
            except QctfeaError as exc:
                row.append(f"{case} failed ({exc})"[:120])
        if MPI.COMM_WORLD.rank == 0:
            print(f"{name}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
