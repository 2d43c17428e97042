"""The default damage integration (imex) against the implicit solution (Newton) on the
pipeline's own models (docs/nonlinear.md, "Accuracy against the implicit solution").

For each scan folder (a ``results/<cohort>/<patient>/<timepoint>`` with mesh, materials,
vertebra.json and screws.json) and load case, nonlinear solves on 2 MPI ranks. With the
local law (``nonlocal_length_mm: null``; the default ``--law local``):
``integration: newton`` with 4x smaller base steps and steps down to 1/100 of them, imex
with 20x tighter step control (``--fine``), and imex at the defaults. With ``--law
nonlocal`` (the default nonlocal average, which Newton does not support): imex with 20x
tighter step control (``--fine``) and at the defaults. Writes the table of strengths and
increments.

    .venv/bin/python tools/imex_check.py --scan results/demo/P01/M00 \
        --scan results/verse-l3/R01/M00 --fine results/demo/P01/M00 --out-md /tmp/imex.md
    .venv/bin/python tools/imex_check.py --law nonlocal --scan results/verse-l3/R01/M00 \
        --fine results/verse-l3/R01/M00 --out-md /tmp/imex_nonlocal.md

Not part of the library or the tests (tests/test_plasticity.py checks the same on a
heterogeneous block). About 10 minutes for the demo scan with --fine, 4 for the L3.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qctfea.mdtable import pipe_table
from qctfea_bench.convergence import CASES, solve_case

FINE = {"imex_damage_tolerance": 0.001, "min_increment_fraction": 0.01}
#: law -> column -> loads settings; the last column is compared with the first
SETTINGS = {
    "local": {
        "Newton": {"integration": "newton", "increments": 100, "min_increment_fraction": 0.01,
                   "nonlocal_length_mm": None},
        "imex, fine steps": {**FINE, "nonlocal_length_mm": None},
        "imex, defaults": {"nonlocal_length_mm": None},
    },
    "nonlocal": {"imex, fine steps": FINE, "imex, defaults": {}},
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
    ap.add_argument("--law", choices=list(SETTINGS), default="local")
    a = ap.parse_args()
    settings = SETTINGS[a.law]
    ref = next(iter(settings))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scan in a.scan:
            d = _model_dir(scan, Path(tmp))
            for case, side in CASES:
                cells, got = [], {}
                for name, params in settings.items():
                    if name == "imex, fine steps" and scan not in a.fine:
                        cells.append("")
                        continue
                    r = got[name] = solve_case(case, side, d, scan, 2, params, "nonlinear")
                    cells.append(f"{r['strength_n']:.1f} ({r['increments']})")
                    print(f"[imex-check] {scan} {case} {side or ''} {name}: "
                          f"{r['strength_n']} N ({r['stop_reason']}, {r['increments']} "
                          f"increments, {r['seconds']['total']:.1f} s)", flush=True)
                dev = (got["imex, defaults"]["strength_n"] / got[ref]["strength_n"] - 1
                       if ref in got else None)
                rows.append([str(scan), f"{case} {side or ''}".strip(), *cells,
                             "" if dev is None else f"{100 * dev:+.2f} %"])
    table = pipe_table(["scan", "load case", *(f"{n} (N, increments)" for n in settings),
                        f"defaults vs {ref}"], rows, "ll" + "r" * (len(settings) + 1))
    a.out_md.write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
