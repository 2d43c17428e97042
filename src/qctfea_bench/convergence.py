"""Mesh-convergence study: one scan meshed at several sizes, stiffness at each.

For a processed scan (a ``results/<cohort>/<patient>/<timepoint>/`` folder
with ``vertebra.nii.gz``, ``vertebra.json``, ``screws.json`` and
``density.nii.gz``) the vertebra and its screws are meshed at each requested
bone cell size (screw cells half as large, bone within ``peri_screw_mm`` of a
screw a third as large, the labelled image at ``voxel_mm``), materials are mapped with the cohort's settings, and the
*linear* pullout (each side) and compression models are solved under
``mpiexec``; with ``--strength`` the nonlinear ones too (the cohort's loads settings
otherwise the defaults), whose strength the crack band keeps from depending on the element
size (docs/nonlinear.md).

The result is a table per level (cells, DOFs, stiffness, solve time, Krylov
iterations) with each stiffness's change relative to the next finer level;
the criterion is a change below 5 % between the two finest levels.
Command (docs/mesh_convergence.md holds the record)::

    qctfea-bench mesh-convergence --scan results/demo/P01/M00 --out-dir results/convergence \\
        --out-md docs/mesh_convergence.md --sizes 4.5 3.0 2.0 1.5 --strength
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qctfea.errors import QctfeaError
from qctfea.mdtable import pipe_table
from qctfea.provenance import write_text

log = logging.getLogger(__name__)

#: text after this line of an existing --out-md file is kept when the table is regenerated
NOTES_MARK = "<!-- notes: kept when the table above is regenerated -->"

QUANTITIES = [("compression_stiffness_n_per_mm", "compression"),
              ("pullout_left_stiffness_n_per_mm", "pullout left"),
              ("pullout_right_stiffness_n_per_mm", "pullout right")]
#: with --strength: the nonlinear strengths
STRENGTHS = [("compression_strength_n", "compression"),
             ("pullout_left_strength_n", "pullout left"),
             ("pullout_right_strength_n", "pullout right")]
CASES = [("compression", None), ("pullout", "left"), ("pullout", "right")]


def mpiexec() -> str:
    """The mpiexec of this environment (beside the interpreter), else the one on PATH."""
    exe = Path(sys.executable).with_name("mpiexec")
    found = str(exe) if exe.exists() else shutil.which("mpiexec")
    if not found:
        raise QctfeaError("mpiexec not found beside the Python interpreter nor on PATH")
    return found


def solve_case(case: str, side: str | None, level_dir: Path, scan: Path, ranks: int,
               loads: dict | None = None, analysis: str = "linear") -> dict:
    """Solve of ``level_dir``'s mesh and materials under mpiexec (a fresh process, as
    the pipeline runs it), with ``scan``'s vertebra.json and screws.json; ``loads`` adds
    to the loads section. Returns the result JSON with the process's wall time."""
    out = level_dir / f"{analysis}_{case}{'_' + side if side else ''}.json"
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "qctfea.cli", "solve", case,
           "--mesh", str(level_dir / "mesh.xdmf"), "--materials", str(level_dir / "materials.npz"),
           "--vertebra", str(scan / "vertebra.json"), "--screws", str(scan / "screws.json"),
           "--out-json", str(out), "--params", json.dumps({**(loads or {}), "analysis": analysis})]
    if side:
        cmd += ["--side", side]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise QctfeaError(f"{case} {side or ''} solve failed at {level_dir}:\n{res.stderr[-2000:]}")
    d = json.loads(out.read_text(encoding="utf-8"))
    d["wall_s"] = time.perf_counter() - t0
    return d


def check_scan(scan) -> Path:
    """``scan`` as a Path after checking it is a processed baseline scan folder."""
    scan = Path(scan)
    for name in ("vertebra.nii.gz", "vertebra.json", "screws.json", "density.nii.gz"):
        if not (scan / name).exists():
            raise QctfeaError(f"{scan / name} is missing: --scan must be a processed scan folder "
                              "(results/<cohort>/<patient>/<timepoint>) of a baseline scan")
    return scan


def mesh_level(scan: Path, d: Path, size: float, voxel_mm: float, materials_cfg: dict | None,
               ctx: str) -> tuple[float, float, dict]:
    """Mesh the scan's vertebra and screws at bone cell size ``size`` (screw cells half, bone
    near the screws a third) into ``d`` and map its materials; returns the seconds of each
    and the mesh report."""
    from qctfea.steps import model as steps_model

    t0 = time.perf_counter()
    steps_model.mesh(parts_path=scan / "vertebra.nii.gz", screws_path=scan / "screws.json",
                     out_mesh=d / "mesh.xdmf", out_json=d / "mesh.json",
                     cfg={"voxel_mm": voxel_mm, "bone_cell_size_mm": size,
                          "screw_cell_size_mm": size / 2,
                          "peri_screw_cell_size_mm": size / 3}, context=ctx)
    t_mesh = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps_model.materials(mesh_path=d / "mesh.xdmf", density_path=scan / "density.nii.gz",
                          screws_path=scan / "screws.json", out_npz=d / "materials.npz",
                          out_json=d / "materials.json", cfg=dict(materials_cfg or {}), context=ctx)
    t_mat = time.perf_counter() - t0
    return t_mesh, t_mat, json.loads((d / "mesh.json").read_text(encoding="utf-8"))


def run_study(scan: str | Path, out_dir: str | Path, sizes: list[float], voxel_mm: float = 0.5,
              ranks: int = 2, materials_cfg: dict | None = None,
              strength: bool = False, loads: dict | None = None) -> list[dict]:
    """Mesh, map and solve (linear; with ``strength`` also nonlinear) at each bone cell size;
    returns one row per level."""
    scan, out_dir = check_scan(scan), Path(out_dir)
    rows = []
    for size in sorted(sizes, reverse=True):
        d = out_dir / f"bone_{size:g}mm"
        d.mkdir(parents=True, exist_ok=True)
        ctx = f"{scan} at bone cell size {size:g} mm"
        log.info(f"[convergence] {ctx}: meshing")
        t_mesh, t_mat, mesh_rep = mesh_level(scan, d, size, voxel_mm, materials_cfg, ctx)
        row = {"bone_cell_size_mm": size, "screw_cell_size_mm": size / 2,
               "peri_screw_cell_size_mm": size / 3, "voxel_mm": voxel_mm,
               "n_cells": mesh_rep["n_cells"], "mesh_s": round(t_mesh, 1),
               "materials_s": round(t_mat, 1),
               "min_dihedral_deg": round(mesh_rep["min_dihedral_deg"], 1)}
        for (key, label), (case, side) in zip(QUANTITIES, [("compression", None),
                                                           ("pullout", "left"),
                                                           ("pullout", "right")], strict=True):
            log.info(f"[convergence] {ctx}: solving {label} (linear, {ranks} ranks)")
            r = solve_case(case, side, d, scan, ranks, loads)
            row[key] = r["stiffness_n_per_mm"]
            row["n_dofs"] = r["n_dofs"]
            row[f"{case}{'_' + side if side else ''}_solve_s"] = round(r["wall_s"], 1)
            row[f"{case}{'_' + side if side else ''}_ksp_iterations"] = r["ksp_iterations"]
        for (key, label), (case, side) in zip(STRENGTHS, CASES, strict=True):
            if not strength:
                break
            log.info(f"[convergence] {ctx}: solving {label} (nonlinear, {ranks} ranks)")
            r = solve_case(case, side, d, scan, ranks, loads, analysis="nonlinear")
            if r.get("refused"):
                raise QctfeaError(f"{ctx}: {r['refused']}")
            row[key] = r["strength_n"]
            row[f"{case}{'_' + side if side else ''}_nonlinear_s"] = round(r["wall_s"], 1)
            log.info(f"[convergence] {ctx}: {label} strength {r['strength_n']:.0f} N "
                     f"({r['stop_reason']}, {r['increments']} increments)")
        rows.append(row)
        log.info(f"[convergence] {ctx}: {row['n_cells']} cells, {row['n_dofs']} DOFs, "
                 + ", ".join(f"{lab} {row[k]:.0f} N/mm" for k, lab in QUANTITIES))
    add_changes_to_finer(rows, [k for k, _ in QUANTITIES + (STRENGTHS if strength else [])])
    return rows


def add_changes_to_finer(rows: list[dict], keys: list[str]) -> None:
    """Each level's ``<key>_change_to_finer_pct``: its value relative to the next finer
    level's (rows from coarse to fine), in %; the finest level has none."""
    for coarse, fine in zip(rows, rows[1:]):
        for key in keys:
            coarse[f"{key}_change_to_finer_pct"] = 100.0 * (coarse[key] / fine[key] - 1.0)


def markdown(rows: list[dict], command: str, scan: str) -> str:
    """The study as a markdown record."""
    lines = [
        "# Mesh convergence", "",
        f"Scan: `{scan}`. Command:", "", "```bash", command, "```", "",
        "Linear analyses (stiffness) at each bone cell size; screw cells are half as large, "
        "bone within 3 mm of a screw a third; "
        "the labelled image given to CGAL has the same spacing at every level. "
        "'Δ to finer' is the change of the stiffness relative to the next finer level.", "",
    ]
    table = []
    for r in rows:
        cells = [f"{r['bone_cell_size_mm']:g} / {r['screw_cell_size_mm']:g} / "
                 f"{r['peri_screw_cell_size_mm']:.2g}", str(r["n_cells"]),
                 str(r["n_dofs"])]
        for key, _ in QUANTITIES:
            ch = r.get(f"{key}_change_to_finer_pct")
            cells += [f"{r[key]:.0f}", "—" if ch is None else f"{ch:+.1f} %"]
        solve = r["compression_solve_s"] + r["pullout_left_solve_s"] + r["pullout_right_solve_s"]
        its = ", ".join(str(r[k]) for k in ("compression_ksp_iterations",
                                            "pullout_left_ksp_iterations",
                                            "pullout_right_ksp_iterations"))
        cells += [f"{r['mesh_s']:.1f}", f"{solve:.1f}", its]
        table.append(cells)
    lines.append(pipe_table(
        ["bone / screw / peri-screw cell (mm)", "cells", "DOFs", "compression (N/mm)",
         "Δ to finer", "pullout left (N/mm)", "Δ to finer", "pullout right (N/mm)",
         "Δ to finer", "mesh s", "solve s (3 cases)", "Krylov its (compr., left, right)"],
        table, "l" + "r" * 10 + "l"))
    if len(rows) >= 2:
        worst = max(abs(rows[-2][f"{k}_change_to_finer_pct"]) for k, _ in QUANTITIES)
        lines += ["", f"Largest stiffness change between the two finest levels: {worst:.1f} % "
                      f"({'within' if worst < 5 else 'NOT within'} the 5 % criterion)."]
    if rows and STRENGTHS[0][0] in rows[0]:
        lines += ["", "Nonlinear strength (damage model with the loads settings of the command; "
                  "docs/nonlinear.md) at each "
                  "level; seconds are the three nonlinear solves' wall time.", ""]
        table = []
        for r in rows:
            cells = [f"{r['bone_cell_size_mm']:g} / {r['screw_cell_size_mm']:g} / "
                     f"{r['peri_screw_cell_size_mm']:.2g}"]
            for key, _ in STRENGTHS:
                ch = r.get(f"{key}_change_to_finer_pct")
                cells += [f"{r[key]:.0f}", "—" if ch is None else f"{ch:+.1f} %"]
            cells.append(", ".join(f"{r[k]:.0f}" for k in (
                "compression_nonlinear_s", "pullout_left_nonlinear_s",
                "pullout_right_nonlinear_s")))
            table.append(cells)
        lines.append(pipe_table(
            ["bone / screw / peri-screw cell (mm)", "compression (N)", "Δ to finer",
             "pullout left (N)", "Δ to finer", "pullout right (N)", "Δ to finer",
             "nonlinear s (compr., left, right)"], table, "l" + "r" * 6 + "l"))
        if len(rows) >= 2:
            worst = max(abs(rows[-2][f"{k}_change_to_finer_pct"]) for k, _ in STRENGTHS)
            lines += ["", f"Largest strength change between the two finest levels: "
                          f"{worst:.1f} % ({'within' if worst < 5 else 'NOT within'} the 5 % "
                          "criterion)."]
    return "\n".join(lines) + "\n"


def main_cli(a) -> None:
    rows = run_study(a.scan, a.out_dir, a.sizes, a.voxel_mm, a.ranks,
                     strength=a.strength, loads=a.loads)
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(a.out_dir) / "convergence.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    cmd = (f"qctfea-bench mesh-convergence --scan {a.scan} --out-dir {a.out_dir} --out-md {a.out_md} "
           f"--sizes {' '.join(f'{s:g}' for s in a.sizes)} --voxel-mm {a.voxel_mm:g} "
           f"--ranks {a.ranks}{' --strength' if a.strength else ''}"
           + (f" --loads '{json.dumps(a.loads)}'" if a.loads else ""))
    text = markdown(rows, cmd, str(a.scan))
    out = Path(a.out_md)
    # keep the hand-written notes
    if out.exists() and NOTES_MARK in out.read_text(encoding="utf-8"):
        text += "\n" + NOTES_MARK + out.read_text(encoding="utf-8").split(NOTES_MARK, 1)[1]
    write_text(out, text)
    print(text)
