"""The default damage integration (imex) against the implicit solution (Newton) on the
pipeline's own models (docs/nonlinear.md, "Accuracy against the implicit solution").

For each scan folder (a ``results/<cohort>/<patient>/<timepoint>`` with mesh, materials,
vertebra.json and screws.json) and load case, three nonlinear solves on 2 MPI ranks:
``integration: newton`` with 4x smaller base steps and steps down to 1/100 of them, imex
with 20x tighter step control (``--fine``), and imex at the defaults. Writes the table of
strengths and increments.

    .venv/bin/python tools/imex_check.py --scan results/demo/P01/M00 \
        --scan results/verse-l3/R01/M00 --fine results/demo/P01/M00 --out-md /tmp/imex.md

Not part of the library or the tests (tests/test_plasticity.py checks the same on a
heterogeneous block). About 10 minutes for the demo scan with --fine, 4 for the L3.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qctfea.mdtable import pipe_table
from qctfea_bench.convergence import CASES, solve_case

SETTINGS = {
    "Newton": {"integration": "newton", "increments": 100, "min_increment_fraction": 0.01},
    "imex, fine steps": {"imex_damage_tolerance": 0.001, "min_increment_fraction": 0.01},
    "imex, defaults": {},
}


def _model_dir(scan: Path, tmp: Path) -> Path:
    """A folder holding links to the scan's mesh and materials: the solves write their
    JSONs there, not into the scan's results."""
    d = Path(tempfile.mkdtemp(dir=tmp))
    for name in ("mesh.xdmf", "mesh.h5", "materials.npz"):
        (d / name).symlink_to((scan / name).resolve())
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", type=Path, action="append", required=True)
    ap.add_argument("--fine", type=Path, action="append", default=[],
                    help="scans on which the fine-step imex runs too (slow: ~500 increments)")
    ap.add_argument("--out-md", type=Path, required=True)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scan in a.scan:
            d = _model_dir(scan, Path(tmp))
            for case, side in CASES:
                cells, got = [], {}
                for name, params in SETTINGS.items():
                    if name == "imex, fine steps" and scan not in a.fine:
                        cells.append("")
                        continue
                    r = got[name] = solve_case(case, side, d, scan, 2, params, "nonlinear")
                    cells.append(f"{r['strength_n']:.1f} ({r['increments']})")
                    print(f"[imex-check] {scan} {case} {side or ''} {name}: "
                          f"{r['strength_n']} N ({r['stop_reason']}, {r['increments']} "
                          f"increments, {r['seconds']['total']:.1f} s)", flush=True)
                dev = got["imex, defaults"]["strength_n"] / got["Newton"]["strength_n"] - 1
                rows.append([str(scan), f"{case} {side or ''}".strip(), *cells,
                             f"{100 * dev:+.2f} %"])
    table = pipe_table(["scan", "load case", "Newton (N, increments)",
                        "imex, fine steps (N, increments)", "imex, defaults (N, increments)",
                        "defaults vs Newton"], rows, "llrrrr")
    a.out_md.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
