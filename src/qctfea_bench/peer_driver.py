"""Runs ParOSol (parosol-py) on one voxel model; executed by :mod:`qctfea_bench.peer` with the
*peer's* Python (its own virtual environment, ``make peer-env``), by path::

    .peer-venv/bin/python src/qctfea_bench/peer_driver.py --material E.npy --spacing 1.5 ...

It imports only numpy and parosol_py (GPL-2.0-or-later, deliberately not a dependency of
qctfea: it is installed in a separate environment and called as a program). The voxel
model is ``E.npy``: Young's moduli in MPa, z-y-x order, 0 = empty. The test is ParOSol's
constrained axial compression along z: every node of the bottom voxel layer fixed, every
node of the top layer moved by ``strain`` x height along z with its lateral displacements
held at zero. Writes a JSON with the stiffness (N/mm, reaction force / displacement) and
the solver's iterations and times.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="peer_driver")
    p.add_argument("--material", required=True, help="npy file, E in MPa, zyx order")
    p.add_argument("--spacing", type=float, required=True, help="voxel size (mm)")
    p.add_argument("--poisson", type=float, default=0.3)
    p.add_argument("--strain", type=float, default=-0.01)
    p.add_argument("--tolerance", type=float, default=1e-6)
    p.add_argument("--level", type=int, default=0, help="multigrid levels (0: from the size)")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--out-json", required=True)
    a = p.parse_args(argv)

    import numpy as np
    import parosol_py
    from parosol_py import solve

    t0 = time.perf_counter()
    mat = np.load(a.material).astype(np.float32)
    level = a.level
    if level <= 0:  # coarsest multigrid grid about 4 voxels or more in every direction
        level = max(2, min(6, int(np.floor(np.log2(min(mat.shape) / 4.0))) + 1))
    t1 = time.perf_counter()
    r = solve(material=mat, spacing=(a.spacing,) * 3, poisson_ratio=a.poisson, test="axial",
              test_axis="z", strain=a.strain, tolerance=a.tolerance, level=level,
              mpi_processes=a.ranks, mpi_launcher="packaged", work_dir=a.work_dir,
              outputs=("sed",))
    t2 = time.perf_counter()
    mech = r.diagnostics.get("mechanics", {})
    run = r.summary.run
    out = {
        "parosol_py": getattr(parosol_py, "__version__", "unknown"),
        "dims_zyx": list(mat.shape), "spacing_mm": a.spacing,
        "voxels": int((mat > 0).sum()), "level": level, "ranks": a.ranks,
        "tolerance": a.tolerance, "poisson": a.poisson, "strain": a.strain,
        "stiffness_n_per_mm": float(mech["generalized_stiffness"]["value"]),
        "reaction_force_n": float(mech["reaction_force"]["z"]),
        "applied_displacement_mm": float(mech["applied_displacement"]["z"]),
        "iterations": int(run.iterations), "relative_residual": float(run.relative_residual),
        "parosol_overall_s": float(run.overall_time_seconds),
        "seconds": {"load": t1 - t0, "solve_call": t2 - t1},
        "command": " ".join(str(c) for c in r.command),
    }
    Path(a.out_json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
