"""Side by side with a peer micro-FE solver: ParOSol, through parosol-py.

A documented command, not a timed test::

    make peer-env        # once: parosol-py in its own environment (.peer-venv)
    qctfea-bench peer --scan results/verse-l3/L3/M00 --out-dir results/peer \\
        --out-md docs/performance.md

Both tools solve **the same specimen**, built here from one processed scan (the real L3
sample by default):

* **Bone**: the vertebral body of the pipeline's parts image (``vertebra.nii.gz``, labels
  body + trabecular ROI; the posterior elements are cut off, as in a vertebral-body
  compression test).
* **Density and law**: the pipeline's calibrated density image (``density.nii.gz``, the
  scan's own calibration) and the cohort's density-modulus law
  (:func:`qctfea.model.materials.modulus_mpa`, ``materials`` section; default Keyak 1998), the
  same Poisson's ratio for both tools.
* **End conditions**: PMMA end caps (``materials.cap_modulus_mpa``) poured over the
  endplates up to two planes normal to the body axis, ``cap_mm`` beyond the highest and
  lowest bone: in every column of the grid over the body's footprint the voxels above
  the topmost (below the lowest) bone voxel are cap. The bottom plane is clamped and the
  top plane moved by 1 % of the specimen height along the axis with its lateral
  displacements held at zero: ParOSol's constrained axial test, and the pipeline's
  compression boundary conditions, which load the caps' outer faces when a model has
  caps (:mod:`qctfea.fea.loadcases`).
* **Grids**: one box in the scanner's patient frame (the body axis of the sample is the
  scanner's z axis, checked), its corners on the CT's voxel boundaries and its edges
  multiples of ``unit_mm`` (3 mm), so that every voxel size in the sweep tiles the same
  box. At the CT's own voxel size (1.5 mm for the L3 sample: ParOSol's *native*
  resolution) the grid's voxels are the CT's voxels and the densities are the CT's values;
  at finer voxel sizes they are interpolated linearly, and the body is the linearly
  interpolated mask at >= 0.5.

**Peer** (``peer_driver.py`` under the peer's Python): voxel model with E per voxel from the
shared E field (:func:`modulus_image`: the law on the CT's voxels, interpolated
trilinearly, which is what our element integration samples), ParOSol's CG + multigrid solve, stiffness = top reaction /
displacement. **Ours**: the body + cap label image on the finest grid (``mesh_voxel_mm``,
the pipeline's ``mesh.voxel_mm``) meshed with tetrahedra (:func:`qctfea.steps.model.mesh`, no
screws) at each bone cell size, element moduli integrated over each element from the same
density image (:func:`qctfea.steps.model.materials`), linear compression solve under ``mpiexec``
(:func:`qctfea.steps.fea.solve`). Every time is wall-clock of what a user would run for one
stiffness: ours mesh + materials + solve (a fresh MPI process: start-up and imports
included); the peer's material mapping + its ``solve()`` call (writing its input, the MPI
run, reading the results).

**Goals**: our stiffness within 10 % of the peer's at its native voxel size; our
time to a stiffness converged within 2 % shorter than the peer's. A tool's *converged
stiffness* is its finest level's; its *time to 2 %* is the wall time of its coarsest level
from which every finer level stays within 2 % of the converged stiffness.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.mdtable import pipe_table
from qctfea.provenance import write_text

log = logging.getLogger(__name__)

PEER_REQUIREMENT = "parosol-py==0.1.26"
PEER_VENV = ".peer-venv"
BEGIN_MARK = "<!-- peer:begin -->"
END_MARK = "<!-- peer:end -->"
BODY_PARTS = (1, 3)  #: masks.BODY, masks.TRABECULAR
STRAIN = 0.01  #: applied compressive strain (both tools; stiffness is independent of it)


# --- the specimen --------------------------------------------------------------------------


def specimen_box(parts: sitk.Image, cap_mm: float, unit_mm: float, margin_mm: float) -> dict:
    """Box (lower corner, edge lengths, mm) around the body's voxels in the patient frame.

    Corners on the CT's voxel boundaries; lateral margin ``margin_mm``, axial margin
    ``cap_mm`` (the caps' least thickness); every edge rounded up to a multiple of
    ``unit_mm`` by extending the upper side.
    """
    d = np.array(parts.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-6):
        raise QctfeaError("peer: the scan's direction matrix is oblique; the specimen box is "
                          "built in the scanner frame and needs axis-aligned voxels")
    s = np.array(parts.GetSpacing())
    arr = sitk.GetArrayFromImage(parts)
    body = np.isin(arr, BODY_PARTS)
    if not body.any():
        raise QctfeaError("peer: the parts image has no vertebral body (labels 1, 3)")
    from qctfea.imaging.masks import voxel_centres_mm

    c = voxel_centres_mm(parts, np.argwhere(body))
    half = np.abs(d @ s) / 2.0  # half a voxel along each patient axis
    lo = c.min(axis=0) - half - np.array([margin_mm, margin_mm, cap_mm])
    hi = c.max(axis=0) + half + np.array([margin_mm, margin_mm, cap_mm])
    length = np.ceil((hi - lo) / unit_mm - 1e-9) * unit_mm
    return {"lower_mm": lo.tolist(), "length_mm": length.tolist(),
            "body_centroid_mm": c.mean(axis=0).tolist(), "ct_spacing_mm": s.tolist()}


def _grid(box: dict, spacing: float) -> sitk.Image:
    n = np.round(np.array(box["length_mm"]) / spacing).astype(int)
    if not np.allclose(n * spacing, box["length_mm"], atol=1e-6):
        raise QctfeaError(f"peer: voxel size {spacing:g} mm does not tile the box "
                          f"{box['length_mm']} mm; use a divisor of the unit length")
    ref = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    ref.SetSpacing([float(spacing)] * 3)
    ref.SetOrigin([float(v) for v in np.array(box["lower_mm"]) + spacing / 2.0])
    return ref


def caps_from_body(body: np.ndarray) -> np.ndarray:
    """Cap voxels (z, y, x arrays, z = superior): in every column that holds bone, the voxels
    above its topmost and below its lowest bone voxel."""
    body = np.asarray(body, bool)
    footprint = body.any(axis=0)[None]
    below_all = np.cumsum(body, axis=0) == 0
    above_all = np.cumsum(body[::-1], axis=0)[::-1] == 0
    return footprint & (below_all | above_all)


def modulus_image(density: sitk.Image, mat_params) -> sitk.Image:
    """The law applied voxel by voxel on the scan's grid (MPa): the E field both tools share.

    Our materials step integrates the trilinear interpolation of this image over each
    element (:mod:`qctfea.model.materials`); the peer's voxels take its trilinear interpolation
    at their centres (at the CT's own voxel size: the CT voxel's value itself)."""
    from qctfea.model.materials import modulus_mpa

    rho = sitk.GetArrayFromImage(density).astype(float)
    img = sitk.GetImageFromArray(modulus_mpa(rho, mat_params).astype(np.float32))
    img.CopyInformation(density)
    return img


def build_specimen(parts: sitk.Image, density: sitk.Image, box: dict, spacing: float,
                   youngs: sitk.Image | None = None) -> dict:
    """Body mask, cap mask, density (and E, from ``youngs``) on the grid of ``spacing``."""
    ref = _grid(box, spacing)
    ident = sitk.Transform()
    body_f = sitk.Cast(sitk.BinaryThreshold(sitk.Cast(parts, sitk.sitkUInt8), 1, 1, 1, 0)
                       | sitk.BinaryThreshold(sitk.Cast(parts, sitk.sitkUInt8), 3, 3, 1, 0),
                       sitk.sitkFloat32)
    body = sitk.GetArrayFromImage(sitk.Resample(body_f, ref, ident, sitk.sitkLinear, 0.0)) >= 0.5
    rho = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(density, sitk.sitkFloat32), ref, ident,
                                               sitk.sitkLinear, 0.0))
    E = None
    if youngs is not None:
        E = sitk.GetArrayFromImage(sitk.Resample(youngs, ref, ident, sitk.sitkLinear, 0.0))
    if body[0].any() or body[-1].any():
        raise QctfeaError("peer: bone reaches the box's end planes; increase cap_mm")
    caps = caps_from_body(body)
    return {"reference": ref, "body": body, "caps": caps, "density": rho.astype(np.float32),
            "youngs": E, "spacing_mm": float(spacing)}


def voxel_nodes(occupied: np.ndarray) -> int:
    """Nodes of a voxel model: grid corners touched by at least one occupied voxel."""
    occ = np.asarray(occupied, bool)
    nodes = np.zeros(tuple(n + 1 for n in occ.shape), bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                nodes[dz:dz + occ.shape[0], dy:dy + occ.shape[1], dx:dx + occ.shape[2]] |= occ
    return int(nodes.sum())


def voxel_moduli(spec: dict, mat_params) -> np.ndarray:
    """E (MPa, z-y-x) of every voxel: on bone the interpolated E image (``build_specimen``
    with ``youngs``; else the law at the voxel's interpolated density), the cap modulus on
    caps, 0 elsewhere."""
    from qctfea.model.materials import modulus_mpa

    E = np.zeros(spec["body"].shape, np.float32)
    b = spec["body"]
    E[b] = (spec["youngs"][b] if spec.get("youngs") is not None
            else modulus_mpa(spec["density"][b], mat_params))
    E[b] = np.maximum(E[b], mat_params.e_floor_mpa)
    E[spec["caps"]] = mat_params.cap_modulus_mpa
    return E


# --- the two tools -------------------------------------------------------------------------


def peer_python(path: str | None) -> str:
    cand = Path(path) if path else Path(PEER_VENV) / "bin" / "python"
    if not cand.exists():
        raise QctfeaError(f"peer: no Python at {cand}; run `make peer-env` (installs "
                          f"{PEER_REQUIREMENT} into {PEER_VENV}/) or pass --peer-python")
    return str(cand)


def run_peer(E: np.ndarray, spacing: float, poisson: float, d: Path, py: str, ranks: int,
             tolerance: float) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "E.npy", E)
    out = d / "parosol.json"
    driver = Path(__file__).with_name("peer_driver.py")
    cmd = [py, str(driver), "--material", str(d / "E.npy"), "--spacing", f"{spacing:g}",
           "--poisson", f"{poisson:g}", "--strain", f"{-STRAIN:g}", "--tolerance",
           f"{tolerance:g}", "--ranks", str(ranks), "--work-dir", str(d / "work"),
           "--out-json", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise QctfeaError(f"peer: ParOSol failed at {spacing:g} mm:\n{res.stdout[-1500:]}\n"
                          f"{res.stderr[-1500:]}")
    r = json.loads(out.read_text(encoding="utf-8"))
    r["wall_s"] = wall
    return r


def prepare_ours(spec: dict, box: dict, d: Path) -> None:
    """Parts image (1 body, 4 cap), the axis record and an empty screw list for our steps."""
    from qctfea.imaging.masks import BODY, CAP
    from qctfea.steps import image_like, write_image

    d.mkdir(parents=True, exist_ok=True)
    parts = np.zeros(spec["body"].shape, np.uint8)
    parts[spec["caps"]] = CAP
    parts[spec["body"]] = BODY
    write_image(image_like(parts, spec["reference"]), d / "parts.nii.gz")
    height = float(box["length_mm"][2])
    axis = {"superior_axis": [0.0, 0.0, 1.0], "centroid_mm": box["body_centroid_mm"],
            "height_mm": height, "specimen": "body + PMMA caps (qctfea-bench peer)"}
    (d / "vertebra.json").write_text(json.dumps(axis, indent=1), encoding="utf-8")
    (d / "screws.json").write_text(json.dumps({"screws": []}), encoding="utf-8")


def run_ours(common: Path, density_path: Path, cell_mm: float, voxel_mm: float, d: Path,
             materials_cfg: dict, ranks: int, height_mm: float, ctx: str) -> dict:
    from qctfea.steps import model as steps_model

    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps_model.mesh(parts_path=common / "parts.nii.gz", screws_path=common / "screws.json",
                     out_mesh=d / "mesh.xdmf", out_json=d / "mesh.json",
                     cfg={"voxel_mm": voxel_mm, "bone_cell_size_mm": cell_mm,
                          "screw_cell_size_mm": cell_mm / 2,
                          "peri_screw_cell_size_mm": cell_mm / 3},
                     context=ctx)
    t_mesh = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps_model.materials(mesh_path=d / "mesh.xdmf", density_path=density_path,
                          screws_path=common / "screws.json", out_npz=d / "materials.npz",
                          out_json=d / "materials.json", cfg=materials_cfg, context=ctx)
    t_mat = time.perf_counter() - t0
    from qctfea_bench.convergence import solve_case

    r = solve_case("compression", None, d, common, ranks, {"displacement_mm": STRAIN * height_mm})
    t_solve = r["wall_s"]
    rep = json.loads((d / "mesh.json").read_text(encoding="utf-8"))
    return {"bone_cell_size_mm": cell_mm, "n_cells": rep["n_cells"], "n_dofs": r["n_dofs"],
            "stiffness_n_per_mm": r["stiffness_n_per_mm"], "ksp_iterations": r["ksp_iterations"],
            "seconds": {"mesh": t_mesh, "materials": t_mat, "solve_process": t_solve,
                        "solve_inner": (r.get("seconds") or {})},
            "wall_s": t_mesh + t_mat + t_solve}


# --- convergence and goals -----------------------------------------------------------------


def time_to_converged(levels: list[dict], tol: float = 0.02) -> dict:
    """Levels ordered coarse -> fine. Converged = the finest stiffness; the time is that of the
    coarsest level from which every finer level is within ``tol`` of it."""
    if not levels:
        raise QctfeaError("peer: no levels")
    ref = levels[-1]["stiffness_n_per_mm"]
    first = len(levels) - 1
    for i in range(len(levels) - 1, -1, -1):
        if abs(levels[i]["stiffness_n_per_mm"] / ref - 1.0) <= tol:
            first = i
        else:
            break
    lev = levels[first]
    return {"converged_stiffness_n_per_mm": ref, "level_index": first,
            "wall_s": lev["wall_s"], "stiffness_n_per_mm": lev["stiffness_n_per_mm"],
            "finest_is_only": first == len(levels) - 1 and len(levels) > 1}


def goals(ours: list[dict], peer: list[dict], native_mm: float) -> dict:
    native = [p for p in peer if abs(p["spacing_mm"] - native_mm) < 1e-6]
    if not native:
        raise QctfeaError(f"peer: the sweep has no level at the native voxel size {native_mm:g}")
    o, p = time_to_converged(ours), time_to_converged(peer)
    diff = o["converged_stiffness_n_per_mm"] / native[0]["stiffness_n_per_mm"] - 1.0
    return {"stiffness_vs_native": diff, "stiffness_met": abs(diff) <= 0.10,
            "ours": o, "peer": p, "time_met": o["wall_s"] < p["wall_s"],
            "native_mm": native_mm,
            "native_stiffness_n_per_mm": native[0]["stiffness_n_per_mm"]}


# --- the harness -----------------------------------------------------------------------------


# Long on purpose: the harness's run in order (specimen, both tools per level, control).
def run(scan, out_dir, voxel_sizes: list[float], cell_sizes: list[float], ranks: int = 2,
        peer_py: str | None = None, cap_mm: float = 3.0, unit_mm: float = 3.0,
        margin_mm: float = 1.5, mesh_voxel_mm: float = 0.5, tolerance: float = 1e-6,
        materials_cfg: dict | None = None, control_density: float | None = None,
        control_voxel_sizes: list[float] | None = None,
        control_cell_sizes: list[float] | None = None) -> dict:
    from qctfea import steps
    from qctfea.model.materials import MaterialParams

    scan, out_dir = Path(scan), Path(out_dir)
    for name in ("vertebra.nii.gz", "vertebra.json", "density.nii.gz"):
        if not (scan / name).exists():
            raise QctfeaError(f"{scan / name} is missing: --scan must be a processed scan "
                              "folder (results/<cohort>/<patient>/<timepoint>)")
    py = peer_python(peer_py)
    vertebra = json.loads((scan / "vertebra.json").read_text(encoding="utf-8"))
    axis = vertebra.get("superior_axis", [0, 0, 1])
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(np.asarray(axis)[2]))
                                          / float(np.linalg.norm(axis))))))
    if tilt > 2.0:
        raise QctfeaError(f"peer: the body axis of {scan} is {tilt:.1f}° from the scanner's z "
                          "axis; the specimen is built in the scanner frame (tilt <= 2°)")
    mcfg = dict(materials_cfg or {})
    mp = steps.params_from(MaterialParams, mcfg, "materials")
    if mp.poisson_bone != mp.cap_poisson:
        raise QctfeaError("peer: ParOSol takes one Poisson's ratio here; set "
                          "materials.poisson_bone equal to materials.cap_poisson")
    parts = sitk.ReadImage(str(scan / "vertebra.nii.gz"))
    density = sitk.ReadImage(str(scan / "density.nii.gz"))
    native = float(max(parts.GetSpacing()))
    box = specimen_box(parts, cap_mm, unit_mm, margin_mm)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def sweep(dens_img: sitk.Image, dens_path: Path, sub: Path, peer_sizes, cells):
        peer_rows, ours_rows = [], []
        youngs = modulus_image(dens_img, mp)
        for s in sorted(peer_sizes, reverse=True):
            t0 = time.perf_counter()
            spec = build_specimen(parts, dens_img, box, s, youngs)
            E = voxel_moduli(spec, mp)
            t_map = time.perf_counter() - t0
            log.info(f"[peer] ParOSol at {s:g} mm: {int((E > 0).sum())} voxels")
            r = run_peer(E, s, mp.poisson_bone, sub / f"parosol_{s:g}mm", py, ranks, tolerance)
            r.update(spacing_mm=s, body_voxels=int(spec["body"].sum()),
                     n_dofs=3 * voxel_nodes(E > 0),
                     cap_voxels=int(spec["caps"].sum()), map_s=t_map, solve_wall_s=r["wall_s"],
                     body_volume_cm3=float(spec["body"].sum() * s ** 3 / 1000))
            r["wall_s"] = t_map + r["solve_wall_s"]
            peer_rows.append(r)
            log.info(f"[peer]   {r['stiffness_n_per_mm']:.0f} N/mm, {r['iterations']} its, "
                     f"{r['wall_s']:.1f} s")
        for c in sorted(cells, reverse=True):
            ctx = f"peer specimen of {scan} at bone cell size {c:g} mm"
            log.info(f"[peer] ours at {c:g} mm cells")
            r = run_ours(common, dens_path, c, mesh_voxel_mm, sub / "ours" / f"cell_{c:g}mm",
                         mcfg, ranks, float(box["length_mm"][2]), ctx)
            ours_rows.append(r)
            log.info(f"[peer]   {r['stiffness_n_per_mm']:.0f} N/mm, {r['n_dofs']} DOFs, "
                     f"{r['wall_s']:.1f} s")
        return peer_rows, ours_rows

    common = out_dir / "ours"
    t0 = time.perf_counter()
    spec = build_specimen(parts, density, box, mesh_voxel_mm)
    prepare_ours(spec, box, common)
    t_prep = time.perf_counter() - t0
    peer_rows, ours_rows = sweep(density, scan / "density.nii.gz", out_dir, voxel_sizes,
                                 cell_sizes)
    control = None
    if control_density is not None:
        # The same specimen with one density everywhere: separates geometry, elements and end
        # conditions (this control) from the mapping of a heterogeneous E field (above).
        arr = np.full(sitk.GetArrayFromImage(density).shape, float(control_density), np.float32)
        cimg = sitk.GetImageFromArray(arr)
        cimg.CopyInformation(density)
        cdir = out_dir / "control"
        cdir.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(cimg, str(cdir / "density_uniform.nii.gz"), True)
        cp, co = sweep(cimg, cdir / "density_uniform.nii.gz", cdir,
                       control_voxel_sizes or voxel_sizes, control_cell_sizes or cell_sizes)
        control = {"density_mg_cm3": float(control_density), "peer": cp, "ours": co}
    return {"scan": str(scan), "box": box, "native_mm": native, "ranks": ranks,
            "cap_mm": cap_mm, "mesh_voxel_mm": mesh_voxel_mm, "tolerance_peer": tolerance,
            "materials": {"law": mp.law, "poisson": mp.poisson_bone,
                          "cap_modulus_mpa": mp.cap_modulus_mpa},
            "ours_specimen_s": t_prep, "ours_body_volume_cm3":
                float(spec["body"].sum() * mesh_voxel_mm ** 3 / 1000),
            "peer": peer_rows, "ours": ours_rows, "control": control,
            "goals": goals(ours_rows, peer_rows, native),
            "harness_wall_s": time.perf_counter() - t_start}


def markdown(res: dict, command: str) -> str:
    lines = _intro(res, command)
    for section in (_peer_table, _ours_table, _control_table, _goals_lines):
        lines += section(res)
    return "\n".join(lines) + "\n"


def _intro(res: dict, command: str) -> list[str]:
    """Section start, command, specimen and the ParOSol heading."""
    box = res["box"]
    lines = [
        BEGIN_MARK,
        "## Side by side with ParOSol (parosol-py)",
        "",
        f"Scan: `{res['scan']}`. Command (regenerates this section; JSON in the out-dir; "
        "`make peer-env` installs the peer once, in its own environment):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Specimen: the vertebral body with PMMA caps ({res['cap_mm']:g} mm beyond the "
        f"highest / lowest bone), box {' x '.join(f'{v:g}' for v in box['length_mm'])} mm; "
        f"law `{res['materials']['law']}`, Poisson's ratio {res['materials']['poisson']:g}, "
        f"caps {res['materials']['cap_modulus_mpa']:g} MPa; bottom clamped, top moved 1 % of "
        f"the height along the axis, laterally held (both tools); {res['ranks']} MPI "
        f"process(es) each. ParOSol relative tolerance {res['tolerance_peer']:g}; ours the "
        "pipeline's (CG + GAMG, rtol 1e-10). Times are wall-clock of everything a user runs "
        "for one stiffness (module docstring of `qctfea_bench.peer`).",
        "",
        "**ParOSol** (voxel model; E per voxel: the law on the CT's voxels, interpolated "
        "trilinearly at the voxel centre, the field our elements integrate):",
        "",
    ]
    return lines


def _peer_table(res: dict) -> list[str]:
    """ParOSol's levels."""
    lines: list[str] = []
    ref = res["peer"][-1]["stiffness_n_per_mm"]
    table = []
    for r in res["peer"]:
        tag = " (native)" if abs(r["spacing_mm"] - res["native_mm"]) < 1e-6 else ""
        table.append([
            f"{r['spacing_mm']:g}{tag}", r["voxels"], f"{r['body_volume_cm3']:.1f}",
            r["n_dofs"], r["iterations"], f"{r['stiffness_n_per_mm']:.0f}",
            f"{100 * (r['stiffness_n_per_mm'] / ref - 1):+.1f} %", f"{r['map_s']:.2f}",
            f"{r['solve_wall_s']:.2f}", f"{r['wall_s']:.2f}"])
    lines.append(pipe_table(
        ["voxel (mm)", "voxels", "body cm³", "DOFs", "iterations", "stiffness (N/mm)",
         "vs its finest", "map s", "solve s", "time s"], table, "r" * 10))
    return lines


def _ours_table(res: dict) -> list[str]:
    """Our levels."""
    lines: list[str] = []
    lines += [
        "",
        f"**Ours** (tetrahedra from the body + cap image at {res['mesh_voxel_mm']:g} mm, body "
        f"{res['ours_body_volume_cm3']:.1f} cm³; element moduli integrated from the same "
        "density image):",
        "",
    ]
    ref = res["ours"][-1]["stiffness_n_per_mm"]
    table = []
    for r in res["ours"]:
        s = r["seconds"]
        table.append([
            f"{r['bone_cell_size_mm']:g}", r["n_cells"], r["n_dofs"], r["ksp_iterations"],
            f"{r['stiffness_n_per_mm']:.0f}", f"{100 * (r['stiffness_n_per_mm'] / ref - 1):+.1f} %",
            f"{s['mesh']:.2f}", f"{s['materials']:.2f}", f"{s['solve_process']:.2f}",
            f"{r['wall_s']:.2f}"])
    lines.append(pipe_table(
        ["bone cell (mm)", "cells", "DOFs", "CG iterations", "stiffness (N/mm)", "vs its finest",
         "mesh s", "materials s", "solve s (process)", "time s"], table, "r" * 10))
    return lines


def _control_table(res: dict) -> list[str]:
    """The one-density control, when it was run."""
    lines: list[str] = []
    ctl = res.get("control")
    if ctl:
        lines += [
            "",
            f"**Control: the same specimen with one density, {ctl['density_mg_cm3']:g} mg/cm³, "
            "everywhere** (geometry, elements and end conditions alone):",
            "",
        ]
        cref = ctl["peer"][-1]["stiffness_n_per_mm"]
        table = [[tool, f"{r[key]:g}", f"{r['stiffness_n_per_mm']:.0f}",
                  f"{100 * (r['stiffness_n_per_mm'] / cref - 1):+.1f} %", f"{r['wall_s']:.2f}"]
                 for tool, key, runs in (("ParOSol", "spacing_mm", ctl["peer"]),
                                         ("ours", "bone_cell_size_mm", ctl["ours"]))
                 for r in runs]
        lines.append(pipe_table(["tool", "voxel / bone cell (mm)", "stiffness (N/mm)",
                                 "vs ParOSol's finest", "time s"], table, "lrrrr"))
    return lines


def _goals_lines(res: dict) -> list[str]:
    """The goals against the numbers, and the section end."""
    lines: list[str] = []
    g = res["goals"]
    o, p = g["ours"], g["peer"]
    lines += [
        "",
        "Goals:",
        "",
        f"- **Stiffness within 10 % of the peer's at its native voxel size** "
        f"({g['native_mm']:g} mm: {g['native_stiffness_n_per_mm']:.0f} N/mm): ours converged "
        f"{o['converged_stiffness_n_per_mm']:.0f} N/mm, {100 * g['stiffness_vs_native']:+.1f} %"
        f" — **{'met' if g['stiffness_met'] else 'NOT met'}**.",
        f"- **Time to a stiffness converged within 2 %**: ours {o['wall_s']:.1f} s "
        f"({res['ours'][o['level_index']]['bone_cell_size_mm']:g} mm cells), ParOSol "
        f"{p['wall_s']:.1f} s ({res['peer'][p['level_index']]['spacing_mm']:g} mm voxels) — "
        f"**{'met' if g['time_met'] else 'NOT met'}**."
        + (" (ParOSol's levels do not settle within 2 % before its finest: its time is "
           "that of the finest level, a lower bound.)" if p["finest_is_only"] else "")
        + (" (Our levels do not settle within 2 % before the finest.)"
           if o["finest_is_only"] else ""),
        f"- Harness wall time {res['harness_wall_s']:.0f} s.",
        END_MARK,
    ]
    return lines


def write_section(md_path: Path, section: str, begin: str = BEGIN_MARK,
                  end: str = END_MARK) -> None:
    """Replace the section of ``md_path`` between the markers ``begin`` and ``end`` (the peer
    section by default) with ``section``, or append it."""
    text = md_path.read_text(encoding="utf-8") if md_path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    write_text(md_path, text)


def main_cli(a) -> None:
    mcfg = json.loads(a.materials) if a.materials else {}
    res = run(a.scan, a.out_dir, a.voxel_sizes, a.cell_sizes, a.ranks, a.peer_python,
              a.cap_mm, materials_cfg=mcfg, control_density=a.control_density,
              control_voxel_sizes=a.control_voxel_sizes,
              control_cell_sizes=a.control_cell_sizes)
    out_dir = Path(a.out_dir)
    (out_dir / "peer.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    cmd = (f"qctfea-bench peer --scan {a.scan} --out-dir {a.out_dir} --out-md {a.out_md} "
           f"--voxel-sizes {' '.join(f'{s:g}' for s in a.voxel_sizes)} "
           f"--cell-sizes {' '.join(f'{s:g}' for s in a.cell_sizes)} --ranks {a.ranks}")
    if a.control_density is not None:
        cmd += f" --control-density {a.control_density:g}"
        if a.control_voxel_sizes:
            cmd += f" --control-voxel-sizes {' '.join(f'{s:g}' for s in a.control_voxel_sizes)}"
        if a.control_cell_sizes:
            cmd += f" --control-cell-sizes {' '.join(f'{s:g}' for s in a.control_cell_sizes)}"
    section = markdown(res, cmd)
    write_section(Path(a.out_md), section)
    print(section)
