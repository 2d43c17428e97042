# Reads and validates the cohort config and sample sheet once; input functions.
import functools
import json
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from snakemake.exceptions import WorkflowError

from qctfea.cohort.samples import missing_landmarks, read_sample_sheet
from qctfea.workflow_glue import (
    put_environment_on_path,
    without_job_rate_limit,
    write_failure_summary,
)

SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas"

# The jobs' shell commands (qctfea, mpiexec) come from Snakemake's own environment, also when
# it was started by its path without activating the environment (`.venv/bin/snakemake ...`)
put_environment_on_path()


def check_schema(where, records, schema_name, kind, problems=()):
    """Validate (label, record) pairs against workflow/schemas/<schema_name>; one error lists
    every violation as '<where><label>, <kind> <name>: <problem> (<meaning>)', after the
    given other problems of the same records."""
    schema = yaml.safe_load((SCHEMAS / schema_name).read_text())
    props = schema.get("properties", {})
    problems = list(problems)
    for label, record in records:
        for e in Draft202012Validator(schema).iter_errors(record):
            path = [str(k) for k in e.absolute_path]
            if e.validator == "required":
                path, msg = path + [e.message.split("'")[1]], "missing"
            elif e.validator == "additionalProperties":
                extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
                path, msg = path + [", ".join(extra)], (
                    f"unknown {kind}; allowed: {', '.join(sorted(e.schema.get('properties', {})))}"
                )
            else:
                msg = e.message
            name = ".".join(path) or "(top level)"
            meaning = props.get(path[0], {}).get("description") if path else None
            problems.append(
                f"{where}{label}, {kind} {name}: {msg}" + (f" ({meaning})" if meaning else "")
            )
    if problems:
        raise WorkflowError("invalid cohort input:\n  " + "\n  ".join(problems))


def check_sheet_files(sheet, samples, columns, results):
    """Every file or folder the sheet names in ``columns`` exists (paths relative to the
    folder Snakemake runs in), for each scan not yet ingested (no <results>/<patient>/
    <timepoint>/scan.json: a lab may archive a processed scan's files and rebuild the cohort
    tables); one error lists each missing one by scan and column."""
    missing = [
        f"{sheet}, patient {row.patient}, timepoint {row.timepoint}, column {col}: "
        f"{row[col]} not found"
        for _, row in samples.iterrows()
        if not Path(results, row.patient, row.timepoint, "scan.json").exists()
        for col in columns
        if col in samples.columns
        and row[col]
        and (col != "dxa" or str(row[col]).lower().endswith(".json"))
        and not Path(row[col]).exists()
    ]
    if missing:
        raise WorkflowError(
            "files named by the sample sheet are missing (relative paths are read from "
            f"{Path.cwd()}, the folder Snakemake runs in):\n  " + "\n  ".join(missing)
        )


def sheet_records(path):
    """(line label, row dict) of a tab-separated sample sheet; # comments and blank lines skipped."""
    rows = [
        (n, line.split("\t"))
        for n, line in enumerate(Path(path).read_text().splitlines(), 1)
        if line.strip() and not line.startswith("#")
    ]
    header = [c.strip() for c in rows[0][1]] if rows else []
    # an unnamed column (a trailing tab, as spreadsheets export) holds nothing to check
    return [
        (f", line {n}", {k: v for k, v in zip(header, (c.strip() for c in cells)) if k or v})
        for n, cells in rows[1:]
    ]


def exclusions(samples, entries, where):
    """The sheet's scans named by the cohort config's `exclude` entries, with their reasons;
    an entry that matches no scan of the sheet is an error naming it."""
    out = []
    for i, e in enumerate(entries):
        rows = samples[
            (samples["patient"] == str(e["patient"]))
            & ((samples["timepoint"] == str(e["timepoint"])) if "timepoint" in e else True)
        ]
        if rows.empty:
            raise WorkflowError(
                f"{where}, key exclude.{i}: patient {e['patient']}"
                + (f", timepoint {e['timepoint']}" if "timepoint" in e else "")
                + " is not in the sample sheet; correct the ids or remove the entry"
            )
        out += [
            {
                "patient": r.patient,
                "timepoint": r.timepoint,
                "months": float(r.months),
                "reason": e["reason"],
            }
            for r in rows.itertuples()
        ]
    return out


COHORT = config["cohort"]
COHORT_DIR = Path(config.get("cohorts_dir", "config/cohorts")) / COHORT
if not (COHORT_DIR / "config.yaml").is_file():
    raise ValueError(
        f"cohort '{COHORT}': {COHORT_DIR}/config.yaml not found; create it or choose one of "
        f"{sorted(p.name for p in COHORT_DIR.parent.iterdir() if p.is_dir())}"
    )
CCFG = yaml.safe_load((COHORT_DIR / "config.yaml").read_text()) or {}
check_schema(COHORT_DIR / "config.yaml", [("", CCFG)], "cohort.schema.yaml", "key")


def check_calibration():
    """The calibration settings as the calibrate step will read them: a phantom calibration
    (the default method) that names no phantom is refused here, before any job runs, with
    the presets listed (qctfea.imaging.phantoms.PHANTOM_PRESETS), and so is a
    hydroxyapatite phantom without its own conversion to ash density (materials section).
    True when follow-ups take their baseline's effective energy (phantomless,
    effective_energy, energy_from: baseline)."""
    from qctfea.imaging.calibration import TissueSpec
    from qctfea.imaging.phantoms import PhantomSpec, require_ash_relation
    from qctfea.errors import QctfeaError
    from qctfea.steps import params_from

    cal = CCFG.get("calibration") or {}
    try:
        if cal.get("method", "phantom") == "phantom":
            spec = params_from(PhantomSpec, cal.get("phantom"), "calibration.phantom")
            spec.require_defined()
            require_ash_relation(spec, CCFG.get("materials") or {})
        tspec = params_from(TissueSpec, cal.get("phantomless"), "calibration.phantomless")
    except QctfeaError as exc:
        raise WorkflowError(f"{COHORT_DIR / 'config.yaml'}: {exc}") from exc
    return (
        cal.get("method", "phantom") == "phantomless"
        and tspec.model == "effective_energy"
        and tspec.energy_from == "baseline"
    )


ENERGY_FROM_BASELINE = check_calibration()


def check_clinical():
    """The thresholds of the clinical categories (section clinical) as the aggregation will
    read them: crossed thresholds (fragile not below normal) are refused before any job."""
    from qctfea.cohort.clinical import clinical_params
    from qctfea.errors import QctfeaError

    try:
        clinical_params(CCFG.get("clinical"))
    except QctfeaError as exc:
        raise WorkflowError(f"{COHORT_DIR / 'config.yaml'}: {exc}") from exc


check_clinical()
SHEET = COHORT_DIR / CCFG.get("samples", "samples.tsv")
#: "landmarks": screws from the sample sheet's landmarks files; "auto": from the vertebra mask
PLANNING = (CCFG.get("planning") or {}).get("method", "landmarks")
#: load cases run (loads.cases, checked by the schema): compression always; without pullout
#: no screws are planned or meshed, so the sample sheet needs no landmarks
CASES = (CCFG.get("loads") or {}).get("cases", ["compression", "pullout"])
PULLOUT = "pullout" in CASES
if SHEET.is_file():
    RECORDS = sheet_records(SHEET)
    check_schema(
        SHEET,
        RECORDS,
        "samples.schema.yaml",
        "column",
        [
            missing_landmarks(f"{SHEET}{label}")
            for label, row in RECORDS
            if PULLOUT and PLANNING == "landmarks" and not row.get("landmarks")
        ],
    )
SAMPLES = read_sample_sheet(SHEET, PLANNING if PULLOUT else None)
SAMPLES = SAMPLES.set_index(["patient", "timepoint"], drop=False)
EXCLUDED = exclusions(SAMPLES, CCFG.get("exclude") or [], COHORT_DIR / "config.yaml")
SAMPLES = SAMPLES.drop(index=[(e["patient"], e["timepoint"]) for e in EXCLUDED])
if SAMPLES.empty:
    raise WorkflowError(f"{COHORT_DIR / 'config.yaml'}: `exclude` leaves no scan to analyse")
RES = f"results/{COHORT}"
if "demo" not in CCFG:  # a demo cohort's files are written by rule generate_demo_scan
    # landmarks only where they are read (pullout planned from landmarks)
    check_sheet_files(
        SHEET,
        SAMPLES,
        ["image", "labels", "subregions", "dxa"]
        + (["landmarks"] if PULLOUT and PLANNING == "landmarks" else []),
        RES,
    )
FAILURES = f"logs/{COHORT}/failures.txt"
TASKS = int(CCFG.get("mpi", {}).get("tasks", 1))
SIDES = ["left", "right"]
#: each scan's load-case result files
CASE_FILES = ["compression.json"] + ([f"pullout_{s}.json" for s in SIDES] if PULLOUT else [])


wildcard_constraints:
    patient="[A-Za-z0-9_-]+",
    timepoint="[A-Za-z0-9_-]+",
    side="left|right",
    cohort="[A-Za-z0-9_-]+",


def section(name):
    """A cohort config section as a JSON string for the step's --params."""
    return json.dumps(CCFG.get(name) or {})


def sample(wildcards, column):
    return SAMPLES.loc[(wildcards.patient, wildcards.timepoint), column]


def get_image(wildcards):
    return sample(wildcards, "image")


def target():
    """The mask section's parameters: the target vertebra's label value (mask.label, or looked
    up from mask.convention and mask.vertebra) and its convention (the calibration needs them
    to find the patient, and to read a folder of structure masks)."""
    from qctfea.imaging.masks import MaskParams
    from qctfea.errors import QctfeaError
    from qctfea.steps import params_from

    try:
        return params_from(MaskParams, CCFG.get("mask"), "mask")
    except QctfeaError as exc:
        raise WorkflowError(f"{COHORT_DIR / 'config.yaml'}: {exc}") from exc


def scan_mem(step):
    """resources.mem_mb of a per-scan rule: from the voxel count of the scan's source image
    (its headers) and the step's measured bytes per voxel (qctfea.workflow_glue), so that a
    large clinical CT gets the memory it needs on a cluster; doubled on a retry."""
    from qctfea.workflow_glue import scan_mem_mb, source_voxels

    return lambda wildcards, attempt: scan_mem_mb(
        source_voxels(sample(wildcards, "image")), step, attempt
    )


def get_labels(wildcards):
    return sample(wildcards, "labels")


def get_series_uid(wildcards):
    """The series to read from the scan's DICOM folder (sample-sheet column series_uid);
    None when the cell is empty or the column absent."""
    value = sample(wildcards, "series_uid") if "series_uid" in SAMPLES.columns else ""
    return value or None


def get_subregions(wildcards):
    """The scan's sub-region map (sample-sheet column subregions); none when the cell is
    empty or the column absent (the body is then found by opening)."""
    value = sample(wildcards, "subregions") if "subregions" in SAMPLES.columns else ""
    return [value] if value else []


def get_landmarks(wildcards):
    """The scan's landmarks file; none with planning.method auto (planned from the mask)."""
    return [] if PLANNING == "auto" else sample(wildcards, "landmarks")


def get_months(wildcards):
    return float(sample(wildcards, "months"))


def get_dxa_files(wildcards):
    """DXA cells that are files become inputs of the aggregation."""
    return [v for v in SAMPLES["dxa"] if v and not v.replace(".", "", 1).isdigit()]


REGISTER = bool((CCFG.get("registration") or {}).get("enabled", True))


def baseline_of(patient):
    """The patient's earliest scan in the sample sheet (after exclusions)."""
    rows = SAMPLES[SAMPLES["patient"] == str(patient)]
    return str(rows.sort_values("months", kind="mergesort")["timepoint"].iloc[0])


def baseline_energy_inputs(w):
    """A follow-up's inputs for its baseline's effective energy (ENERGY_FROM_BASELINE): the
    baseline's calibration.json and both scans' scan.json (tube voltage, manufacturer); none
    for a baseline or another calibration."""
    base = baseline_of(w.patient)
    if not ENERGY_FROM_BASELINE or str(w.timepoint) == base:
        return {}
    return {
        "baseline_calibration": f"{RES}/{w.patient}/{base}/calibration.json",
        "baseline_scan": f"{RES}/{w.patient}/{base}/scan.json",
        "own_scan": f"{RES}/{w.patient}/{w.timepoint}/scan.json",
    }


def model_timepoint(patient, timepoint):
    """Whose FE model (mesh, screws, endplates, ROIs) a scan uses: the baseline's when
    follow-ups are registered to baseline (registration.enabled), else its own."""
    return baseline_of(patient) if REGISTER else str(timepoint)


def model_file(name):
    """Input function: a file of the scan's model timepoint."""
    return lambda w: f"{RES}/{w.patient}/{model_timepoint(w.patient, w.timepoint)}/{name}"


def model_screws(w):
    """The screws of the scan's model; none without pullout in loads.cases."""
    return model_file("screws.json")(w) if PULLOUT else []


def model_accepted(w):
    """The planning gate of the scan's model (accept_screws): whatever uses the screws waits
    for it, so nothing runs on refused screws; none without pullout."""
    return model_file("placement.json")(w) if PULLOUT else []


def registration_record(w):
    """A registered follow-up's registration.json; none for a model's own scan."""
    if model_timepoint(w.patient, w.timepoint) == w.timepoint:
        return []
    return f"{RES}/{w.patient}/{w.timepoint}/registration.json"


UNCERTAINTY = bool((CCFG.get("uncertainty") or {}).get("enabled", True))


def model_density(w):
    """The density the scan's model is given: a registered follow-up's on the baseline grid."""
    if model_timepoint(w.patient, w.timepoint) == w.timepoint:
        return f"{RES}/{w.patient}/{w.timepoint}/density.nii.gz"
    return f"{RES}/{w.patient}/{w.timepoint}/density_baseline.nii.gz"


def model_scans():
    """(patient, timepoint) of every FE model: the baselines, or every scan without
    registration."""
    return sorted({(str(p), model_timepoint(p, t)) for p, t in SAMPLES.index})


def scan_and_model(name):
    """Input function: the file ``name`` of the scan and of its model's scan (the baseline's;
    one file for a model's own scan)."""
    return lambda w: sorted(
        {
            f"{RES}/{w.patient}/{t}/{name}"
            for t in (w.timepoint, model_timepoint(w.patient, w.timepoint))
        }
    )


#: The calibration gates (accept_calibration) of the scan and its model's scan: whatever uses
#: a density waits for them, so nothing runs on a refused calibration.
calibration_accepted = scan_and_model("calibration_accepted.json")
#: The label maps' gates (accept_vertebra) of the scan and its model's scan: whatever uses a
#: vertebra's parts waits for them, so nothing runs on a refused label map.
vertebra_accepted = scan_and_model("vertebra_accepted.json")


def registration_transform(w):
    """Input function: a registered follow-up's registration.tfm (baseline points to its
    own); none for a model's own scan."""
    if model_timepoint(w.patient, w.timepoint) == w.timepoint:
        return []
    return f"{RES}/{w.patient}/{w.timepoint}/registration.tfm"


def registration_accepted(w):
    """The registration gate of a registered follow-up (accept_registration): whatever uses
    its density on the baseline grid waits for it; none for a model's own scan."""
    if model_timepoint(w.patient, w.timepoint) == w.timepoint:
        return []
    return f"{RES}/{w.patient}/{w.timepoint}/registration_accepted.json"


def gate_paths(patient, timepoint):
    """The records of the scan's gates in the pipeline's order, one list per gate: its
    inputs (image and label map read, the vertebra in it) and its model's (the baseline's),
    its calibration and its model's, its label map's checks (mask step) and its model's, its
    model's screws (planning, with pullout), its model's mesh, its registration (a
    follow-up), its load cases' results (the strength gate)."""
    p, t = str(patient), str(timepoint)
    mt = model_timepoint(p, t)
    gates = [
        sorted({f"{RES}/{p}/{s}/{name}" for s in (t, mt)})
        for name in ("scan.json", "calibration.json", "vertebra.json")
    ]
    gates += [[f"{RES}/{p}/{mt}/screws.json"]] if PULLOUT else []
    gates.append([f"{RES}/{p}/{mt}/mesh.json"])
    if mt != t:
        gates.append([f"{RES}/{p}/{t}/registration.json"])
    return gates + [[f"{RES}/{p}/{t}/{n}" for n in CASE_FILES]]


#: The checkpoint that writes each gate's records (gate_paths' order).
_GATE_RULES = {
    "scan.json": "ingest_scan",
    "calibration.json": "calibrate_density",
    "vertebra.json": "extract_vertebra",
    "screws.json": "plan_screws",
    "mesh.json": "mesh_vertebra",
    "registration.json": "register_to_baseline",
}


def gate_records(patient, timepoint):
    """The scan's gate records (gate_paths) up to and including the first gate that refused
    the scan. Each is a checkpoint's output, asked for only once the gates before it passed
    (a gate after a refusal cannot run): input functions only, which then wait for those
    checkpoints. With --allowed-rules that leave a checkpoint out, its record is read as
    it is."""
    allowed = workflow.dag_settings.allowed_rules
    records = []
    for gate in gate_paths(patient, timepoint):
        for path in gate:
            name = Path(path).name
            maker = _GATE_RULES.get(name, "solve")
            if not allowed or maker in allowed:
                parts = Path(path).parts
                wildcards = dict(patient=parts[-3], timepoint=parts[-2])
                if maker == "solve":
                    wildcards["case"] = name[: -len(".json")]
                path = getattr(checkpoints, maker).get(**wildcards).output.json
            records.append(str(path))
        if any(_refusal_recorded(r) for r in records[-len(gate) :]):
            break
    return records


def all_gate_records():
    """Every scan's gate records up to its first refusal (input functions only)."""
    return sorted({r for p, t in SAMPLES.index for r in gate_records(p, t)})


def refused(patient, timepoint):
    """Whether a gate refused the scan: its inputs or its baseline's (an unreadable image or
    label map, no vertebra in it), its calibration or its baseline's, its label map's
    checks or its baseline's (the vertebra cut by the field of view, a label map off its
    CT), its model's screws (graded worse than planning.max_grade), its registration, or a
    load case without a peak."""
    return any(_refusal_recorded(r) for r in gate_records(patient, timepoint))


@functools.cache
def _refusal_recorded(path):
    """Whether a gate's record holds a refusal; read once per run (a checkpoint's finished
    output does not change within the run; a not-yet-finished one raises above instead)."""
    return bool(json.loads(Path(path).read_text()).get("refused"))


def kept_scans():
    """The scans whose results enter the cohort tables: every scan of the sheet (after
    exclusions) but those a gate refused (input functions only)."""
    return [(str(p), str(t)) for p, t in SAMPLES.index if not refused(p, t)]


def scan_outputs(name):
    """Input function: a per-scan file of every kept scan."""
    return lambda w: [f"{RES}/{p}/{t}/{name}" for p, t in kept_scans()]


def patient_page_inputs(w):
    """The per-scan files a patient's page shows: of each kept scan, its results, curves,
    compression fields and QC pictures; of its model, the mesh, screws and their pictures."""
    scans = [t for p, t in kept_scans() if p == w.patient]
    files = []
    for t in scans:
        d = f"{RES}/{w.patient}/{t}"
        mt = model_timepoint(w.patient, t)
        files += [f"{d}/{n}" for n in CASE_FILES]
        files += [f"{d}/{n[:-5]}_curve.png" for n in CASE_FILES]
        files += [f"{d}/{n[:-5]}_fields.h5" for n in CASE_FILES]
        files += [
            f"{d}/bmd.json",
            f"{d}/roi.png",
            f"{d}/calibration.png",
        ]
        if mt != t:
            files.append(f"{d}/registration.png")
        m = f"{RES}/{w.patient}/{mt}"
        files += [f"{m}/mesh.xdmf", f"{m}/mesh.h5", f"{m}/mesh.png"]
        files += [f"{m}/screws.json", f"{m}/screws.png"] if PULLOUT else []
    return sorted(set(files))


def timepoints_by_months():
    """The sheet's timepoints in months order."""
    months = SAMPLES.reset_index(drop=True).groupby("timepoint")["months"].median()
    return [str(t) for t in months.sort_values(kind="mergesort").index]


def get_final_outputs(wildcards):
    # The planning gate of every model: a refused scan fails here (the tables go on without
    # it under --keep-going).
    gates = [f"{RES}/{p}/{t}/placement.json" for p, t in model_scans()] if PULLOUT else []
    # The inputs' gate of every scan: an unreadable image or label map fails here.
    gates += [f"{RES}/{p}/{t}/scan_accepted.json" for p, t in SAMPLES.index]
    # The label map's gate of every scan: a vertebra the mask step refused fails here.
    gates += [f"{RES}/{p}/{t}/vertebra_accepted.json" for p, t in SAMPLES.index]
    # The mesh gate of every model: a vertebra that could not be meshed fails here.
    gates += [f"{RES}/{p}/{t}/mesh_accepted.json" for p, t in model_scans()]
    # The calibration gate of every scan: a calibration refused by its gates fails here.
    gates += [f"{RES}/{p}/{t}/calibration_accepted.json" for p, t in SAMPLES.index]
    # The registration gate of every registered follow-up: a failed registration fails here.
    gates += [
        f"{RES}/{p}/{t}/registration_accepted.json"
        for p, t in SAMPLES.index
        if model_timepoint(p, t) != t
    ]
    # The solve gate of every scan: a load case that did not peak fails here.
    gates += [f"{RES}/{p}/{t}/strength.json" for p, t in SAMPLES.index]
    # Every scan's own results, requested here as well as by the tables: the tables wait for
    # the planning checkpoint before they list theirs, a dry-run shows these jobs anyway.
    names = (
        ["bmd.json", "compression.json"]
        + ([f"pullout_{s}.json" for s in SIDES] if PULLOUT else [])
        + (["uncertainty.json"] if UNCERTAINTY else [])
    )
    per_scan = [f"{RES}/{p}/{t}/{n}" for p, t in SAMPLES.index for n in names]
    # every scan's screws and vertebra for 3D Slicer (rule export_slicer)
    per_scan += (
        [f"{RES}/{p}/{t}/slicer/screws.mrk.json" for p, t in SAMPLES.index] if PULLOUT else []
    )
    return (
        gates
        + per_scan
        + [
            f"{RES}/tables/longitudinal.csv",
            f"{RES}/stats/correlations.csv",
            f"{RES}/stats/changes.csv",
            f"{RES}/stats/summary.json",
            f"{RES}/report/summary.html",
        ]
        + [
            f"{RES}/report/patients/{p}.html"
            for p in sorted(SAMPLES["patient"].astype(str).unique())
        ]
    )
