"""``qctfea``: one command per pipeline step, so every step runs by hand too.

Examples::

    qctfea synth --out data/P01/M00 --patient P01 --timepoint M00 --months 0
    qctfea ingest data/P01/M00/dicom --out-image ct.nii.gz --out-json scan.json
    qctfea calibrate ct.nii.gz --labels labels.nii.gz --out-density density.nii.gz ...
    mpiexec -n 2 qctfea solve compression --mesh mesh.xdmf --materials materials.npz ...

Step parameters are given with ``--params`` as a JSON object or ``@file.yaml``
(the same keys as the corresponding section of a cohort config, see
``config/README.md``); unknown keys are refused. Errors a user can act on
are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qctfea import logs
from qctfea.errors import QctfeaError


def _params(text: str | None) -> dict:
    if not text:
        return {}
    if text.startswith("@"):
        import yaml

        return yaml.safe_load(Path(text[1:]).read_text(encoding="utf-8")) or {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QctfeaError(f"--params is not valid JSON: {exc}") from exc


def _ctx(a) -> str:
    return f"patient {a.patient}, timepoint {a.timepoint}"


def _arg(*flags, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One ``add_argument`` of a subcommand: its positional and keyword arguments."""
    return flags, kwargs


#: The arguments of every per-scan step, ahead of its own.
_SCAN_ARGS = (
    _arg("--patient", default="?", help="pseudonymous patient id (for messages)"),
    _arg("--timepoint", default="?", help="timepoint id (for messages)"),
    _arg("--params", help="step parameters: JSON object or @file.yaml"),
)

#: The subcommands: name, help, whether it is a per-scan step (then it takes _SCAN_ARGS
#: first), and its own arguments.
SUBCOMMANDS = (
    ("synth", "write one synthetic demo scan (DICOM series + side files)", True, (
        _arg("--out", required=True),
        _arg("--months", type=float, required=True),
        _arg("--seed", type=int, default=2021),
    )),
    ("ingest", "DICOM series (or NIfTI/NRRD/MHA) -> ct.nii.gz (HU) + scan.json", True, (
        _arg("source"),
        _arg("--out-image", required=True),
        _arg("--out-json", required=True),
        _arg("--series-uid"),
    )),
    ("calibrate", "HU -> K2HPO4 density (mg/cm³) by phantom, phantomless or fixed "
                 "calibration", True, (
        _arg("ct"),
        _arg("--labels", required=True),
        _arg("--label", type=int, default=23),
        _arg("--convention", default="custom",
             help="label convention (mask.convention); needed for a folder of structure masks"),
        _arg("--out-density", required=True),
        _arg("--out-json", required=True),
        _arg("--out-png", required=True),
        _arg("--baseline", nargs=3, metavar=("CALIBRATION", "BASELINE_SCAN", "SCAN"),
             help="a follow-up's baseline calibration.json, the baseline's and this scan's "
                  "scan.json: the baseline's effective energy (phantomless.energy_from)"),
    )),
    ("mask", "label map -> vertebra parts (body, posterior, trabecular ROI)", True, (
        _arg("ct"),
        _arg("--labels", required=True),
        _arg("--out-parts", required=True),
        _arg("--out-json", required=True),
        _arg("--subregions", help="optional sub-region map (VerSe 49/50: the body)"),
    )),
    ("screws", "screw trajectories from landmarks, or planned from the mask "
               "(--planning '{\"method\": \"auto\"}'), each graded on the "
               "Gertzbein-Robbins scale; a screw worse than planning.max_grade fails", True, (
        _arg("--landmarks", help="landmarks JSON (not needed with planning method auto)"),
        _arg("--planning", help="planning section: JSON object or @file.yaml"),
        _arg("--parts", required=True),
        _arg("--out-json", required=True),
        _arg("--out-png", help="QC picture: cuts along each screw with canal and grade"),
        _arg("--level", help="target level (mask.vertebra, e.g. L5): its trajectory range"),
    )),
    ("bmd", "trabecular, integral, around-screw vBMD and areal BMD", True, (
        _arg("--density", required=True),
        _arg("--parts", required=True),
        _arg("--screws", help="screws.json; omitted: a model without screws "
             "(loads.cases without pullout)"),
        _arg("--out-json", required=True),
    )),
    ("register", "follow-up onto baseline (rigid, on the vertebra) -> density on the "
                 "baseline grid, transform, QC JSON and picture", True, (
        _arg("--baseline-density", required=True),
        _arg("--baseline-parts", required=True),
        _arg("--density", required=True),
        _arg("--parts", required=True),
        _arg("--out-density", required=True),
        _arg("--out-json", required=True),
        _arg("--out-tfm", required=True),
        _arg("--out-png", required=True),
    )),
    ("export-slicer", "screws.json and the vertebra -> screws.mrk.json, "
"vertebra.stl, screw_<side>.stl for 3D Slicer (LPS; docs/slicer.md)", False, (
        _arg("--screws", required=True, help="screws.json"),
        _arg("--parts", required=True, help="vertebra parts image (vertebra.nii.gz)"),
        _arg("--out-dir", required=True),
        _arg("--transform", help="a follow-up's registration.tfm: the baseline's screws and "
             "vertebra (--screws, --parts) carried into the follow-up's coordinates"),
        _arg("--patient", default="?", help="pseudonymous patient id (for messages)"),
        _arg("--timepoint", default="?", help="timepoint id (for messages)"),
    )),
    ("validate", "synthetic cohort only: compare calibration, "
"trabecular vBMD and registration with the generator's truth files", False, (
        _arg("--results", required=True, help="results/<cohort>"),
        _arg("--resources", required=True, help="resources/<cohort> (truth.json files)"),
        _arg("--samples", required=True, help="the cohort's samples.tsv"),
        _arg("--out-csv", required=True),
        _arg("--out-md", required=True),
    )),
    ("mesh", "bone + screws -> tetrahedral mesh (CGAL) with cell tags", True, (
        _arg("--parts", required=True),
        _arg("--screws", help="screws.json; omitted: a model without screws "
             "(loads.cases without pullout)"),
        _arg("--out-mesh", required=True),
        _arg("--out-json", required=True),
    )),
    ("materials", "density -> element Young's moduli (volume-integrated)", True, (
        _arg("--mesh", required=True),
        _arg("--density", required=True),
        _arg("--screws", help="screws.json; omitted: a model without screws "
             "(loads.cases without pullout)"),
        _arg("--out-npz", required=True),
        _arg("--out-json", required=True),
    )),
    ("solve", "FE load case, linear or nonlinear (run under mpiexec -n N)", True, (
        _arg("case", choices=["compression", "pullout"]),
        _arg("--side", choices=["left", "right"]),
        _arg("--mesh", required=True),
        _arg("--materials", required=True),
        _arg("--vertebra", required=True, help="vertebra.json from the mask step"),
        _arg("--screws", help="screws.json; omitted: a model without screws "
             "(loads.cases without pullout)"),
        _arg("--out-json", required=True),
        _arg("--solver-params", help="PETSc options: JSON object or @file.yaml"),
        _arg("--out-curve", help="force-displacement curve (CSV)"),
        _arg("--out-plot", help="force-displacement curve (PNG)"),
        _arg("--out-fields", help="fields for ParaView (XDMF; an .h5 is written beside)"),
        _arg("--upstream", nargs="*", default=[],
             help="records of the steps the result rests on (materials.json, bmd.json): when "
             "one holds a refusal, the case is not solved and records that refusal"),
    )),
    ("solve-failed", "record a load case whose `qctfea solve` ended with an error before "
     "writing its result (the solve rule runs it then): a refusal naming the exit code and the "
     "log's last error, so that the cohort tables go on without the scan (--keep-going); "
     "an interrupted solve (exit code 15, 129, 130, 143) is not recorded and exits with its code",
     True, (
        _arg("case", choices=["compression", "pullout"]),
        _arg("--side", choices=["left", "right"]),
        _arg("--exit-code", type=int, required=True, help="the failed solve's exit code"),
        _arg("--log", required=True, help="the failed solve's log"),
        _arg("--out-json", required=True),
        _arg("--out-curve", help="force-displacement curve (CSV)"),
        _arg("--out-plot", help="force-displacement curve (PNG)"),
        _arg("--out-fields", help="fields for ParaView (XDMF; an .h5 is written beside)"),
    )),
    ("aggregate", "per-scan JSONs -> longitudinal table (CSV)", False, (
        _arg("--samples", required=True, help="sample sheet (TSV)"),
        _arg("--results", required=True, help="results/<cohort> folder"),
        _arg("--out-csv", required=True),
        _arg("--cases", default="compression,pullout",
             help="load cases run (loads.cases), comma-separated; without pullout no "
             "pullout files are read"),
        _arg("--clinical", help="the cohort config's clinical section (thresholds of "
             "the clinical categories): JSON object or @file.yaml; default: published"),
    )),
    ("stats", "longitudinal table -> paired tests, Friedman, mixed "
"models, correlations, summary.json", False, (
        _arg("long_csv"),
        _arg("--out-dir", required=True),
        _arg("--exclusions", help="exclusions CSV (patient, timepoint, months, excluded_by, "
             "reason) of scans the cohort config leaves out or a gate refused; named in "
             "summary.json"),
    )),
    ("tables", "longitudinal table -> wide table, change from "
"baseline, summary per timepoint, Table 1", False, (
        _arg("long_csv"),
        _arg("--out-dir", required=True),
    )),
    ("figures", "longitudinal table -> spaghetti and scatter figures", False, (
        _arg("long_csv"),
        _arg("--out-dir", required=True),
        _arg("--cases", default="compression,pullout",
             help="load cases run (loads.cases), comma-separated; without pullout no "
             "pullout figures"),
    )),
    ("montage", "per-scan PNGs -> QC montage (PNG + SVG)", False, (
        _arg("--results", required=True, help="results/<cohort> folder"),
        _arg("--picture", default="calibration.png", help="per-scan file name"),
        _arg("--out-png", required=True),
        _arg("--out-svg", required=True),
    )),
    ("summary-page", "tables, stats, figures -> self-contained HTML", False, (
        _arg("--results", required=True, help="results/<cohort> folder"),
        _arg("--out-html", required=True),
    )),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qctfea", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    for name, help_, per_scan, args in SUBCOMMANDS:
        s = sub.add_parser(name, help=help_)
        for flags, kwargs in (_SCAN_ARGS if per_scan else ()) + args:
            s.add_argument(*flags, **kwargs)
    return p


def run(a) -> None:
    from qctfea.steps import (fea as steps_fea, imaging as steps_imaging, model as steps_model,
                              vertebra as steps_vertebra)

    prm = _params(getattr(a, "params", None))
    if a.step == "synth":
        steps_imaging.synth_scan(out_dir=a.out, patient=a.patient, timepoint=a.timepoint,
                                 months=a.months, seed=a.seed, synth_cfg=prm)
    elif a.step == "ingest":
        steps_imaging.ingest(source=a.source, out_image=a.out_image, out_json=a.out_json,
                             context=_ctx(a), series_uid=a.series_uid, cfg=prm)
    elif a.step == "calibrate":
        steps_imaging.calibrate(ct_path=a.ct, labels_path=a.labels, out_density=a.out_density,
                                out_json=a.out_json, out_png=a.out_png, cfg=prm, context=_ctx(a),
                                label=a.label, convention=a.convention,
                                baseline=dict(zip(("calibration", "scan", "own_scan"),
                                                  a.baseline)) if a.baseline else None)
    elif a.step == "mask":
        steps_vertebra.mask(ct_path=a.ct, labels_path=a.labels, out_parts=a.out_parts,
                            out_json=a.out_json, cfg=prm, context=_ctx(a),
                            subregions_path=a.subregions)
    elif a.step == "screws":
        steps_model.plan_screws(landmarks_path=a.landmarks, parts_path=a.parts, out_json=a.out_json,
                                cfg=prm, context=_ctx(a), planning=_params(a.planning),
                                out_png=a.out_png, level=a.level)
    elif a.step == "bmd":
        steps_imaging.bmd(density_path=a.density, parts_path=a.parts, screws_path=a.screws,
                          out_json=a.out_json, cfg=prm, context=_ctx(a))
    elif a.step == "export-slicer":
        from qctfea.qc import slicer

        for f in slicer.export_scan(a.screws, a.parts, a.out_dir, _ctx(a),
                                    a.transform).values():
            print(f)
    elif a.step == "validate":
        from qctfea.demo import validation

        validation.write_validation(a.results, a.resources, a.samples, a.out_csv, a.out_md)
        print(open(a.out_md).read())
    elif a.step == "register":
        steps_imaging.register(fixed_density=a.baseline_density, fixed_parts=a.baseline_parts,
                               moving_density=a.density, moving_parts=a.parts,
                               out_density=a.out_density,
                               out_json=a.out_json, out_tfm=a.out_tfm, out_png=a.out_png, cfg=prm,
                               context=_ctx(a))
    elif a.step == "mesh":
        steps_model.mesh(parts_path=a.parts, screws_path=a.screws, out_mesh=a.out_mesh,
                         out_json=a.out_json, cfg=prm, context=_ctx(a))
    elif a.step == "materials":
        steps_model.materials(mesh_path=a.mesh, density_path=a.density, screws_path=a.screws,
                              out_npz=a.out_npz, out_json=a.out_json, cfg=prm, context=_ctx(a))
    elif a.step == "solve":
        if a.case == "pullout" and not a.side:
            raise QctfeaError("solve pullout needs --side left or --side right")
        steps_fea.solve(case=a.case, mesh_path=a.mesh, materials_path=a.materials,
                        mask_json=a.vertebra, screws_path=a.screws, out_json=a.out_json,
                        loads_cfg=prm,
                        solver_cfg=_params(a.solver_params), context=_ctx(a), side=a.side,
                        out_curve=a.out_curve, out_plot=a.out_plot, out_fields=a.out_fields,
                        upstream=a.upstream)
    elif a.step == "solve-failed":
        if not steps_fea.solve_failed(case=a.case, side=a.side, exit_code=a.exit_code,
                                      log_path=a.log, out_json=a.out_json, loads_cfg=prm,
                                      context=_ctx(a), out_curve=a.out_curve,
                                      out_plot=a.out_plot, out_fields=a.out_fields):
            sys.exit(a.exit_code)  # interrupted, or not failed: nothing recorded
    elif a.step == "aggregate":
        from qctfea.cohort import analysis as cohort, samples

        rows = [{**r, "dxa": samples.dxa_value(r["dxa"])}
                for r in samples.read_sample_sheet(a.samples).to_dict("records")]
        cohort.aggregate(rows, a.results, a.out_csv, cases=a.cases.split(","),
                         clinical_cfg=_params(a.clinical))
    elif a.step == "stats":
        from qctfea.cohort import analysis as cohort

        cohort.statistics(a.long_csv, a.out_dir, exclusions_csv=a.exclusions)
    elif a.step in ("tables", "figures", "montage", "summary-page"):
        _cohort_step(a)


def _cohort_step(a) -> None:
    """The cohort-level steps after ``stats`` (tables, figures, QC montage, summary page)."""
    from qctfea.cohort import analysis as cohort, longtable
    from qctfea.qc import figures, report

    if a.step == "tables":
        cohort.tables(a.long_csv, a.out_dir)
    elif a.step == "figures":
        figures.cohort_figures(a.long_csv, a.out_dir, cases=a.cases.split(","))
    elif a.step == "montage":
        root = Path(a.results)
        entries = [(f.parent.parent.name, f.parent.name, f)
                   for f in sorted(root.glob(f"*/*/{a.picture}"))]
        if not entries:
            raise QctfeaError(f"no {root}/<patient>/<timepoint>/{a.picture} found")
        df = longtable.read_long_table(root / "tables" / "longitudinal.csv")
        figures.qc_montage(entries, {"png": a.out_png, "svg": a.out_svg}, a.picture,
                           [str(t) for t in longtable.timepoint_months(df).index])
    else:
        root = Path(a.results)
        pngs = sorted((root / "figures").glob("*.png"))
        report.summary_page(
            root / "stats" / "summary.json",
            {k: root / "tables" / v for k, v in cohort.TABLE_FILES.items()},
            {k: root / "stats" / v for k, v in cohort.STAT_FILES.items()},
            [f for f in pngs if not f.stem.startswith("qc_")]
            + [f for f in pngs if f.stem.startswith("qc_")],
            a.out_html, root.name)


#: Seconds a rank waits after printing its error before it aborts every rank, so that
#: mpiexec forwards the output to the log first
ABORT_GRACE_S = 1.0


def _abort_other_ranks() -> None:
    """Under ``mpiexec -n N`` (N > 1, the solve step): end every rank after an unforeseen
    exception on this one. An error raised on some ranks only (a read, memory, an unforeseen
    exception) would otherwise leave the others waiting in their next collective call until a
    cluster's time limit; mpi4py does not abort on an uncaught exception by itself.

    The exception's one-line summary is printed first, then the traceback, then the rank
    waits a second before aborting: the abort kills every rank at once, and output that
    mpiexec had not yet forwarded to the log is lost (a traceback cut after its first lines
    was seen in CI), so the line the refusal quotes (`qctfea solve-failed`) comes first."""
    mpi = sys.modules.get("mpi4py.MPI")  # only when the step used MPI
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() \
            and mpi.COMM_WORLD.size > 1:
        import time
        import traceback

        print("".join(traceback.format_exception_only(sys.exception())).strip(),
              file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        mpi.COMM_WORLD.Abort(2)


def _say_why_terminated(signum, frame) -> None:
    """SIGTERM during a solve (a user, Snakemake, or a cluster's time limit): one line in
    the solve's log saying so (rank 0), naming what to do when the job ran under SLURM,
    whose time limit ends a job this way (a timed-out solve is not recorded as a refusal:
    rerun with more time and it starts again); then the default action, so that the
    process ends by SIGTERM as it would have (exit code 143 to the shell)."""
    import os
    import signal

    mpi = sys.modules.get("mpi4py.MPI")
    rank = (mpi.COMM_WORLD.rank if mpi is not None and mpi.Is_initialized()
            and not mpi.Is_finalized() else 0)
    if rank == 0:
        text = "qctfea solve: terminated (SIGTERM) before it wrote its result"
        job = os.environ.get("SLURM_JOB_ID")
        if job:
            text += (f"; under SLURM most often the job's time limit (`sacct -j {job} -o "
                     "State,Elapsed,Timelimit` says TIMEOUT): raise the solve rule's runtime "
                     "(profiles/slurm/config.yaml, set-resources: solve: runtime, minutes) "
                     "and rerun: the results already written are kept and this load case "
                     "starts again")
        print(text, file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _solve_process_signals() -> None:
    """A `qctfea solve` process (the command line, not a call from Python): PETSc's own
    signal handler would catch SIGTERM and abort (exit code 59 or 15, read as a failed solve,
    not an interrupted one), so it is removed and SIGTERM leaves its note
    (:func:`_say_why_terminated`); a crash (SIGSEGV, SIGFPE, ...) prints the Python
    traceback."""
    import faulthandler
    import io
    import signal

    import dolfinx_solver  # noqa: F401  (before petsc4py)
    from petsc4py import PETSc

    PETSc.Sys.popSignalHandler()
    signal.signal(signal.SIGTERM, _say_why_terminated)
    try:
        faulthandler.enable()
    except (io.UnsupportedOperation, AttributeError, ValueError):
        pass  # stderr is not a file


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv`` None: sys.argv, as the `qctfea` command and
    ``python -m qctfea.cli`` run it), or one step called from Python with ``argv``."""
    args = build_parser().parse_args(argv)
    if args.step == "solve" and argv is None:
        _solve_process_signals()
    handler = logs.log_to(sys.stderr)
    logging.captureWarnings(True)
    try:
        run(args)
    except QctfeaError as exc:
        # (the solve's QctfeaErrors are collective: every rank raises and returns)
        print(f"qctfea {args.step}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        _abort_other_ranks()
        raise
    finally:
        logging.captureWarnings(False)
        logs.remove(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
