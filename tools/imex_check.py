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
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qctfea.mdtable import pipe_table

SETTINGS = {
    "Newton": {"integration": "newton", "increments": 100, "min_increment_fraction": 0.01},
    "imex, fine steps": {"imex_damage_tolerance": 0.001, "min_increment_fraction": 0.01},
    "imex, defaults": {},
}
CASES = (("compression", None), ("pullout", "left"), ("pullout", "right"))


def solve(scan: Path, case: str, side: str | None, params: dict, out: Path) -> dict:
    exe = Path(sys.executable).parent
    cmd = [shutil.which("mpiexec", path=str(exe)) or "mpiexec", "-n", "2",
           str(exe / "qctfea"), "solve", case, "--mesh", str(scan / "mesh.xdmf"),
           "--materials", str(scan / "materials.npz"), "--vertebra",
           str(scan / "vertebra.json"), "--screws", str(scan / "screws.json"),
           "--out-json", str(out), "--params", json.dumps(params)]
    if side:
        cmd += ["--side", side]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(out.read_text())


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
            for case, side in CASES:
                got = {}
                for name, params in SETTINGS.items():
                    if name == "imex, fine steps" and scan not in a.fine:
                        continue
                    r = solve(scan, case, side, params, Path(tmp) / "r.json")
                    got[name] = r
                    print(f"[imex-check] {scan} {case} {side or ''} {name}: "
                          f"{r['strength_n']} N ({r['stop_reason']}, {r['increments']} "
                          f"increments, {r['seconds']['total']:.1f} s)", flush=True)
                newton = got["Newton"]["strength_n"]
                cell = {k: (f"{v['strength_n']:.1f} ({v['increments']})" if k in got
                            else "") for k, v in ((k, got.get(k)) for k in SETTINGS)}
                dev = got["imex, defaults"]["strength_n"] / newton - 1
                rows.append([str(scan), f"{case} {side or ''}".strip(), cell["Newton"],
                             cell["imex, fine steps"], cell["imex, defaults"],
                             f"{100 * dev:+.2f} %"])
    table = pipe_table(["scan", "load case", "Newton (N, increments)",
                        "imex, fine steps (N, increments)", "imex, defaults (N, increments)",
                        "defaults vs Newton"], rows, "llrrrr")
    a.out_md.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
