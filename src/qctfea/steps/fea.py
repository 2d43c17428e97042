"""The FE steps the rules run (fea.smk, uncertainty.smk): one load case under MPI, its
curve and fields, the strength acceptance and the outcome uncertainty (:mod:`qctfea.steps`
holds the shared readers and the config typing).
"""

from __future__ import annotations

import logging
import re
import textwrap
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_files, atomic_path, provenance, read_json, write_json
from qctfea.steps import need_inputs, read_density, read_image, load_screws, params_from

log = logging.getLogger(__name__)


def accept_strength(*, result_paths, out_json, context: str) -> None:
    """The solve stage's gate: fail the scan when a load case's curve did not peak (its
    result's ``refused`` message); else record each case's strength and how the run ended."""
    for p in result_paths:
        if not Path(p).exists():
            raise QctfeaError(f"{context}: load-case result {p} is missing; run the solve step "
                              "(rule solve) first")
    results = {Path(p).stem: read_json(p) for p in result_paths}
    # one message once (a refusal of the steps the cases rest on is every case's)
    refused = list(dict.fromkeys(r["refused"] for r in results.values() if r.get("refused")))
    if refused:
        raise QctfeaError("; ".join(refused))
    cases = {k: {"strength_n": r["strength_n"], "peak_reached": r.get("peak_reached", True),
                 "stop_reason": r.get("stop_reason", "linear analysis")}
             for k, r in results.items()}
    write_json(out_json, {"cases": cases, "provenance": provenance(
        "accept_strength", {}, {k: str(p) for k, p in zip(results, result_paths)})})
    log.info(f"[accept_strength] {context}: " + ", ".join(
        f"{k} {v['strength_n']:.0f} N ({v['stop_reason']})" for k, v in cases.items()))


def uncertainty(*, out_json, context: str, record_failure: bool = False, **inputs) -> None:
    """Intervals and per-scan SDs of the scan's vBMD and strengths (uncertainty.json; see
    :mod:`qctfea.uncertainty` and :func:`_uncertainty` for ``inputs``).

    ``record_failure`` (the workflow): an error of this step is recorded in uncertainty.json
    (key ``failed``; the traceback in the step's log) instead of raised. The step runs after
    every gate on numbers that passed them: a scan without intervals keeps its outcomes, and
    the cohort tables are built with its intervals and least significant changes empty and
    the message in the long table's ``uncertainty_failed`` column."""
    try:
        _uncertainty(out_json=out_json, context=context, **inputs)
    except Exception as exc:
        if not record_failure:
            raise
        if isinstance(exc, QctfeaError):
            why = str(exc).removeprefix(f"{context}: ")  # said once, below
        else:
            log.error(f"[uncertainty] {context}: unexpected error", exc_info=exc)
            why = f"the step failed unexpectedly ({type(exc).__name__}: {exc})"
        failed = (f"{context}: no intervals for this scan: {why}. Its outcomes are reported "
                  "without intervals and its changes without a least significant change. "
                  "What to do: read the step's log (estimate_uncertainty.log); the "
                  "uncertainty settings (uncertainty.*), or report the log to the qctfea "
                  "maintainers")
        log.error(f"[uncertainty] {failed}")
        write_json(out_json, {"failed": failed, "outcomes": {},
                              "provenance": provenance("uncertainty", {}, {})})


def _uncertainty(*, calibration_json, bmd_json, density_path, parts_path, strength_json,
                 screws_path, registration_json, out_json, cfg: dict, materials_cfg: dict,
                 bmd_cfg: dict, context: str, seed_key: str) -> None:
    """The uncertainty step's work. ``screws_path`` None: a model without screws;
    ``registration_json`` None: a baseline (or registration off)."""
    from qctfea.imaging import bmd as bmd_mod
    from qctfea.imaging import masks
    from qctfea.model import materials as mat
    from qctfea import uncertainty as unc

    p = params_from(unc.UncertaintyParams, cfg, "uncertainty")
    mp = params_from(mat.MaterialParams, materials_cfg, "materials")
    bp = params_from(bmd_mod.BmdParams, bmd_cfg, "bmd")
    need_inputs(context, calibration=calibration_json, bmd=bmd_json, density=density_path,
          parts=parts_path, strength=strength_json, screws=screws_path,
          registration=registration_json)
    t0 = time.perf_counter()
    dens, arr = read_density(density_path, context)
    lab = sitk.GetArrayFromImage(read_image(parts_path, "vertebra parts image", context))
    vert = np.isin(lab, masks.BONE_PARTS)
    idx = np.argwhere(vert)
    cases = read_json(strength_json)["cases"]
    reg = read_json(registration_json) if registration_json else {}
    inp = unc.ScanInputs(
        calibration=read_json(calibration_json), bmd=read_json(bmd_json),
        density=arr[vert].astype(float), points_mm=masks.voxel_centres_mm(dens, idx),
        body=np.isin(lab[vert], (masks.BODY, masks.TRABECULAR)),
        screws=load_screws(screws_path),
        strength={"compression": cases.get("compression", {}).get("strength_n"),
                  **{side: cases.get(f"pullout_{side}", {}).get("strength_n")
                     for side in ("left", "right")}},
        yield_fn=lambda rho: mat.yield_mpa(rho, mp),
        follow_up=registration_json is not None,
        registration_spread_mm=float(reg.get("point_spread_mm") or 0.0), shell_mm=bp.shell_mm)
    res = unc.scan_uncertainty(p, inp, seed_key)
    write_json(out_json, {
        "outcomes": res, "level": p.level, "draws": unc.sobol_size(p.draws),
        "calibration_note": inp.calibration.get("uncertainty_note", ""),
        "strength_scheme": "yield-weighted (qctfea.uncertainty; docs/uncertainty.md)",
        "seconds": time.perf_counter() - t0,
        "provenance": provenance("uncertainty", p, {
            "calibration": calibration_json, "bmd": bmd_json, "density": density_path,
            "parts": parts_path, "strength": strength_json})})
    log.info(f"[uncertainty] {context}: " + ", ".join(
        f"{k} {v['value']:.4g} [{v['ci_low']:.4g}, {v['ci_high']:.4g}]" for k, v in res.items()))


# Long on purpose: one load case under MPI, read to write, in order.
def solve(*, case: str, mesh_path, materials_path, mask_json, screws_path, out_json,
          loads_cfg: dict, solver_cfg: dict, context: str, side: str | None = None,
          out_curve=None, out_plot=None, out_fields=None, upstream=()) -> dict:
    """Run one load case; call under ``mpiexec -n N``: every rank runs this.

    Writes the result JSON and, when given, the force-displacement curve (CSV and
    PNG) and the fields for ParaView (XDMF + HDF5: displacement, von Mises stress,
    and for the nonlinear analysis plastic strain and yielded elements).
    ``upstream``: the records of the scan's steps the result rests on that are not gated
    before the solve (the workflow: materials.json, bmd.json); when one holds a refusal,
    the load case is not solved and records that refusal as its own (placeholder curve and
    fields), so that the solve gate (accept_strength) fails the scan and the cohort tables
    go on without it.
    """
    need_inputs(context, mesh=mesh_path, materials=materials_path, vertebra_json=mask_json,
          screws=screws_path if case == "pullout" else None)
    from mpi4py import MPI

    from qctfea.fea import elasticity, loadcases, plasticity, stepping

    comm = MPI.COMM_WORLD
    t0 = time.perf_counter()
    lp = params_from(loadcases.LoadParams, loads_cfg, "loads")
    what = f"{context} {case}{' ' + side if side else ''}"
    refusal = next((r for r in (read_json(p).get("refused") for p in upstream) if r), None)
    if refusal:
        return _not_solved(refusal, lp.analysis, what, out_json, out_curve, out_plot,
                           out_fields, comm)
    mesh, tags = elasticity.read_mesh(mesh_path, comm)
    npz = np.load(materials_path)
    if lp.analysis == "nonlinear":
        if "yield_mpa" not in npz:
            raise QctfeaError(f"{context}: {materials_path} has no yield stresses; rerun the "
                              "materials step (rule assign_materials)")
        model = plasticity.PlasticModel(mesh, npz["youngs_mpa"], npz["poisson"],
                                        npz["yield_mpa"], lp.hardening_ratio, lp.constitutive,
                                        lp.nonlinear())
    else:
        model = elasticity.ElasticModel(mesh, npz["youngs_mpa"], npz["poisson"])
    axis_info = read_json(mask_json)
    opts = dict(solver_cfg or {})
    progress = (lambda m: log.info(f"[solve] {what}:{m}")) if comm.rank == 0 else None
    if progress:
        progress(f" {lp.analysis} analysis, {model.n_dofs()} dofs, {comm.size} rank(s)")
    if case not in ("compression", "pullout"):
        raise QctfeaError(f"unknown load case {case!r}; use compression or pullout")
    screw = None
    if case == "pullout":
        screw = {s.side: s for s in load_screws(screws_path)}.get(side)
        if screw is None:
            raise QctfeaError(f"{context}: no {side!r} screw in {screws_path}")
    try:
        if case == "compression":
            res = loadcases.solve_compression(model, tags, npz["tags"], axis_info, lp, opts,
                                              progress=progress)
        else:
            res = loadcases.solve_pullout(model, tags, npz["tags"], npz["centroids_mm"],
                                          axis_info, screw, lp, opts, progress=progress)
    except QctfeaError as exc:
        # The solve failed on this scan's model (a linear solve that did not converge, no
        # endplate or screw-head nodes, a first increment that failed): every rank raises it
        # (the checks are collective), and it is recorded like a curve without a peak, so
        # that accept_strength fails the scan and, with --keep-going, the cohort tables are
        # built without it (tables/exclusions.csv gives the reason).
        res = _no_result(lp.analysis, f"solve failed: {exc}", n_dofs=model.n_dofs())
    if not res.get("failed") and res.get("stiffness_n_per_mm") is not None:
        res["stiffness_bounds"] = _stiffness_bounds(case, res, mesh_path, npz, axis_info, lp,
                                                    screw, comm)
    if out_fields:
        _write_fields(model, out_fields, comm)
    res["seconds"]["total"] = time.perf_counter() - t0
    if res.get("failed"):
        res["refused"] = (
            f"{context}, {case}{' ' + side if side else ''} ({out_json}): {res['stop_reason']}. "
            "No strength is reported. What to do: look at the mesh (mesh.json, the QC "
            "pictures) and the solve log; coarser or finer mesh sizes (mesh.*), solver options "
            "(solver: in the cohort config), or exclude the scan (exclude: in the cohort "
            "config)")
    elif lp.analysis == "nonlinear" and not res["peak_reached"]:
        # No strength for a curve that has not peaked (docs/nonlinear.md): recorded in the
        # result, which the gate (accept_strength) and the cohort tables then refuse.
        limit = ("loads.compression_max_strain" if case == "compression"
                 else "loads.pullout_max_displacement_mm")
        res["refused"] = (
            f"{context}, {case}{' ' + side if side else ''} ({out_json}): {res['stop_reason']}. "
            f"No strength is reported. What to do: raise {limit} if the curve still rose at "
            "the end, or smaller increments (loads.increments, loads.min_increment_fraction) "
            "if Newton failed; else exclude the scan (exclude: in the cohort config)")
    bounds = res.get("stiffness_bounds")
    if bounds and bounds.get("within") is False and not res.get("refused"):
        res["strength_n"] = None
        res["refused"] = (
            f"{context}, {case}{' ' + side if side else ''} ({out_json}): stiffness "
            f"{res['stiffness_n_per_mm']:.0f} N/mm outside the bounds "
            f"{bounds['lower_n_per_mm']:.0f}-{bounds['upper_n_per_mm']:.0f} N/mm that the model "
            "gives without solving (docs/science.md#stiffness-bounds): the solve is wrong. No "
            "strength is reported. What to do: look at the solve log (the linear solver's "
            "reason, fallbacks); other solver options (solver: in the cohort config) or mesh "
            "sizes (mesh.*); else exclude the scan (exclude: in the cohort config)")
    res["solver_options"] = {**(stepping.NONLINEAR_PETSC_OPTIONS if lp.analysis == "nonlinear"
                                else elasticity.DEFAULT_PETSC_OPTIONS), **opts}
    if comm.rank == 0:
        if out_curve:
            write_curve_csv(res["curve"], out_curve)
        if out_plot:
            plot_curve(res, out_plot, what)
        write_json(out_json, {**res, "provenance": provenance(
            f"solve_{case}", lp, {"mesh": mesh_path, "materials": materials_path})})
        if res.get("failed"):
            log.info(f"[solve] {what}: {res['stop_reason']}, {res['n_dofs']} dofs, "
                     f"{comm.size} rank(s), {res['seconds']['total']:.1f} s")
        else:
            extra = (f" ({res['strength_rule']} rule; {res['stop_reason']}), "
                     f"{res['increments']} increments, {res['newton_iterations']} Newton"
                     if lp.analysis == "nonlinear" else "")
            strength = ("none (peak not reached)" if res["strength_n"] is None
                        else f"{res['strength_n']:.0f} N")
            log.info(f"[solve] {what}: stiffness {res['stiffness_n_per_mm']:.0f} N/mm, "
                     f"strength {strength}, {res['ksp_iterations']} Krylov iterations"
                     f"{extra}, {res['n_dofs']} dofs, {comm.size} rank(s), "
                     f"{res['seconds']['total']:.1f} s")
        if res.get("refused"):
            log.info(f"[solve] refused: {res['refused']}")
    comm.barrier()
    return res


def _stiffness_bounds(case, res, mesh_path, npz, axis_info, lp, screw, comm) -> dict:
    """The solved model's stiffness bounds (:func:`qctfea.fea.bounds.check_solve`), computed
    on rank 0 from the mesh file and shared with every rank; a check that could not run
    (e.g. a degenerate cell) or whose bounds hold other nodes than the solve's is recorded
    and refuses nothing."""
    from qctfea.fea.bounds import check_solve

    out = None
    if comm.rank == 0:
        try:
            out = check_solve(
                case, res, mesh_path=mesh_path, materials=npz, axis_info=axis_info,
                zone_fraction=lp.endplate_zone_fraction, angle_deg=lp.endplate_angle_deg,
                head_face_mm=lp.head_face_mm,
                screw=None if screw is None else {"side": screw.side,
                                                  "entry_mm": screw.entry_mm,
                                                  "axis": screw.axis})
        except (ValueError, np.linalg.LinAlgError) as exc:  # a check that could not run
            out = {"error": f"{type(exc).__name__}: {exc}"}
            log.warning(f"[solve] stiffness bounds not computed: {out['error']}")
        else:
            if not out["nodes_match"]:
                log.warning("[solve] stiffness bounds not checked: their endplate or head "
                            "nodes differ from the solve's")
    return comm.bcast(out, root=0)


def _no_result(analysis: str, stop_reason: str, **extra) -> dict:
    """The result of a load case that gave no curve (a solve that failed, or one not run)."""
    return {"analysis": analysis, "strength_n": None, "peak_reached": False,
            "stiffness_n_per_mm": None, "stop_reason": stop_reason, "curve": [],
            "increments": 0, "newton_iterations": 0, "ksp_iterations": 0, "seconds": {},
            "failed": True, **extra}


def _not_solved(refusal: str, analysis: str, what: str, out_json, out_curve, out_plot,
                out_fields, comm) -> dict:
    """The outputs of a load case not solved because a step it rests on refused the scan
    (:func:`solve`, ``upstream``): the refusal in the result, an empty curve, its picture
    saying why, and fields files that nothing reads."""
    res = _no_result(analysis, f"not solved: {refusal}", refused=refusal)
    if comm.rank == 0:
        _write_placeholders(res, what, out_json, out_curve, out_plot, out_fields,
                            "not solved: a step this load case rests on refused the scan")
        log.info(f"[solve] {what}: not solved, refused: {refusal}")
    comm.barrier()
    return res


def _write_placeholders(res: dict, what: str, out_json, out_curve, out_plot, out_fields,
                        note: str) -> None:
    """A result without a curve (``res``), an empty curve, its picture saying why, and
    fields files that nothing reads (``note`` in the XDMF): the solve rule's outputs."""
    if out_curve:
        write_curve_csv([], out_curve)
    if out_plot:
        plot_curve(res, out_plot, what)
    if out_fields:
        out = Path(out_fields)
        with atomic_files(out.with_suffix(".h5"), out) as scratch:
            (Path(scratch) / out.name).write_text(f"<!-- {note} -->\n")
            (Path(scratch) / out.with_suffix(".h5").name).write_bytes(b"")
    write_json(out_json, {**res, "provenance": provenance("solve", {}, {})})


#: Exit codes of a solve that was interrupted (SIGHUP, SIGINT, SIGTERM: a user, Snakemake
#: or the cluster's time limit), not ended by an error: not recorded, the job fails as it is.
#: 15: MPICH's mpiexec for ranks ended by SIGTERM (it reports the signal's number)
INTERRUPTED_EXIT_CODES = (15, 129, 130, 143)
#: Log lines the refusal quotes, the last one of the first kind found: a Python exception's
#: line, else any line naming an error (MPI's abort, a signal, a killed process)
_ERROR_LINES = (re.compile(r"^[\w.]*(Error|Exception)\b"),
                re.compile(r"error|exception|abort|killed|segmentation|signal|exit code",
                           re.IGNORECASE))


def solve_failed(*, case: str, exit_code: int, log_path, out_json, loads_cfg: dict,
                 context: str, side: str | None = None, out_curve=None, out_plot=None,
                 out_fields=None) -> bool:
    """Record a load case whose solve (``qctfea solve`` under mpiexec or srun) ended with
    ``exit_code`` before it wrote its result: an unforeseen error on some rank (the ranks
    abort together), a crash (a signal) or a process killed for memory. The result holds
    the refusal, with the exit code and the last error line of the solve's log, and
    placeholder curve, picture and fields, so that the solve gate (accept_strength) fails
    the scan with that message and, with --keep-going, the cohort tables are built without
    it. An interrupted solve (:data:`INTERRUPTED_EXIT_CODES`) is not recorded: returns
    False, and the job fails as it is."""
    if exit_code in INTERRUPTED_EXIT_CODES or exit_code == 0:
        return False
    import signal

    from qctfea.fea.loadcases import LoadParams

    lp = params_from(LoadParams, loads_cfg, "loads")
    how = f"exit code {exit_code}"
    if exit_code > 128:
        try:
            how += f" ({signal.Signals(exit_code - 128).name})"
        except ValueError:
            pass
    text = (Path(log_path).read_text(encoding="utf-8", errors="replace")
            if Path(log_path).exists() else "")
    # (lines without a letter, such as a traceback's ~~~^^^ markers, say nothing)
    lines = [ln.strip() for ln in text.splitlines() if re.search("[A-Za-z]", ln)]
    quoted = next((ln for pattern in _ERROR_LINES for ln in reversed(lines)
                   if pattern.search(ln)), lines[-1] if lines else "the log is empty")
    hint = ("a process killed (SIGKILL) has most often run out of memory: raise the solve's "
            "memory (the rule's mem_mb) or use a coarser mesh (mesh.*); "
            if exit_code == 137 else "")
    label = f"{case}{' ' + side if side else ''}"
    what = f"{context} {label}"
    refusal = (
        f"{context}, {label} ({out_json}): the solve stopped "
        f"with {how} before writing its result (last error in {log_path}: "
        f"{textwrap.shorten(quoted, 300)!r}). No strength is reported. What to do: read "
        f"the solve log; {hint}to solve it again, remove {out_json} (or run snakemake "
        "with --forcerun solve); else exclude the scan (exclude: in the cohort config)")
    res = _no_result(lp.analysis, f"solve stopped with {how}", refused=refusal)
    _write_placeholders(res, what, out_json, out_curve, out_plot, out_fields,
                        f"not solved: the solve stopped with {how}")
    log.info(f"[solve] {what}: the solve stopped with {how}; recorded as refused")
    return True


def _write_fields(model, out_fields, comm) -> None:
    """XDMF + HDF5 written in a scratch folder (every rank), then both moved into place by
    rank 0 (atomic)."""
    import contextlib

    out = Path(out_fields)
    with (atomic_files(out.with_suffix(".h5"), out) if comm.rank == 0
          else contextlib.nullcontext()) as scratch:
        scratch = comm.bcast(scratch, root=0)
        model.write_fields(Path(scratch) / out.name)
        comm.barrier()
    comm.barrier()


def write_curve_csv(curve: list[dict], path) -> None:
    import csv

    keys = list(curve[0]) if curve else ["displacement_mm", "force_n"]  # a failed solve: none
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(curve)


def plot_curve(res: dict, path, title: str) -> None:
    """Force-displacement curve with the strength marked."""
    from matplotlib.figure import Figure

    d = [p["displacement_mm"] for p in res["curve"]]
    f = [p["force_n"] for p in res["curve"]]
    fig = Figure(figsize=(5, 3.6), dpi=110)
    ax = fig.subplots()
    ax.plot(d, f, "o-", ms=3, lw=1.5)
    heading = f"{title} ({res.get('analysis', 'linear')})"

    def wrapped(text: str) -> str:  # at most the axes' width (about 60 characters of 9 pt)
        return "\n".join(textwrap.wrap(text, 60))

    if res["strength_n"] is not None:
        ax.axhline(res["strength_n"], color="C3", ls="--", lw=1,
                   label=f"strength {res['strength_n']:.0f} N")
        ax.set_title(wrapped(heading), fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    elif res.get("failed"):
        ax.set_title(wrapped(heading + ": solve failed, no strength"), fontsize=9, color="C3")
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(res["stop_reason"], 60)),
                transform=ax.transAxes, ha="center", va="center", fontsize=7, color="C3")
    else:
        ax.set_title(wrapped(heading + ": peak not reached, no strength"), fontsize=9,
                     color="C3")
    ax.set_xlabel("displacement (mm)")
    ax.set_ylabel("force (N)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
