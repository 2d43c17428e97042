# Cohort level: long table -> tables, statistics, figures, QC montage, summary page.
# Everything here works on the scans the sample sheet lists: a patient without a
# timepoint simply has no row, and every output says what it used.
from qctfea.cohort.analysis import STAT_FILES, TABLE_FILES
from qctfea.qc.figures import SCATTER_PREDICTORS, figure_files, spaghetti_metrics

# Per-scan pictures shown in the QC montages: {kind: file name in <patient>/<timepoint>/}.
# Add a kind here when a per-scan rule writes another PNG.
QC_PICTURES = {"calibration": "calibration.png", "roi": "roi.png"}
FIGURES = figure_files(f"{RES}/figures", CASES)


rule aggregate_cohort:
    input:
        bmd=scan_outputs("bmd.json"),
        compression=scan_outputs("compression.json"),
        pullout=lambda w: (
            [f"{RES}/{p}/{t}/pullout_{s}.json" for p, t in kept_scans() for s in SIDES]
            if PULLOUT
            else []
        ),
        mesh=lambda w: [f"{RES}/{p}/{model_timepoint(p, t)}/mesh.json" for p, t in kept_scans()],
        screws=lambda w: (
            [f"{RES}/{p}/{model_timepoint(p, t)}/screws.json" for p, t in kept_scans()]
            if PULLOUT
            else []
        ),
        # every scan's gate records up to its first refusal: a refused scan is left out
        gates=lambda w: all_gate_records(),
        calibration=scan_outputs("calibration.json"),
        scan=scan_outputs("scan.json"),  # the acquisition: protocol changes from baseline
        # intervals and per-scan SDs (uncertainty.enabled)
        uncertainty=scan_outputs("uncertainty.json") if UNCERTAINTY else [],
        dxa=get_dxa_files,
    output:
        report(
            f"{RES}/tables/longitudinal.csv",
            caption="../report/longitudinal.rst",
            category="Tables",
        ),
    log:
        f"logs/{COHORT}/aggregate_cohort.log",
    conda:
        "../../envs/cohort.yaml"
    params:
        # every scan of the sheet; aggregate() leaves out those whose screws were refused
        samples=[
            {**r, "model_timepoint": model_timepoint(r["patient"], r["timepoint"])}
            for r in SAMPLES.reset_index(drop=True).to_dict("records")
        ],
        # results/<cohort>, where the per-scan JSONs are: from the output, not hard-coded.
        results=lambda wc, output: str(Path(output[0]).parent.parent),
        cases=CASES,
        # thresholds of the clinical categories (config section clinical; checked in common.smk)
        clinical=CCFG.get("clinical") or {},
    script:
        "../scripts/aggregate_cohort.py"


rule record_exclusions:
    input:
        # every scan's gate records up to its first refusal (planning, registration, the
        # load cases' peaks): a refusal is listed with its message
        records=lambda w: all_gate_records(),
    output:
        report(
            f"{RES}/tables/exclusions.csv",
            caption="../report/exclusions.rst",
            category="Tables",
        ),
    log:
        f"logs/{COHORT}/record_exclusions.log",
    conda:
        "../../envs/cohort.yaml"
    params:
        excluded=EXCLUDED,
        scans=[
            {
                "patient": str(p),
                "timepoint": str(t),
                "months": float(m),
                # the gates' records, one list per gate in order (gate_records: a gate after
                # a refusal is not run and not read)
                "gates": gate_paths(p, t),
            }
            for (p, t), m in SAMPLES["months"].items()
        ],
    script:
        "../scripts/record_exclusions.py"


rule cohort_tables:
    input:
        rules.aggregate_cohort.output[0],
    output:
        **{
            name: report(
                f"{RES}/tables/{fname}", caption=f"../report/{name}.rst", category="Tables"
            )
            for name, fname in TABLE_FILES.items()
        },
    log:
        f"logs/{COHORT}/cohort_tables.log",
    conda:
        "../../envs/cohort.yaml"
    script:
        "../scripts/cohort_tables.py"


rule compute_statistics:
    input:
        long=rules.aggregate_cohort.output[0],
        exclusions=rules.record_exclusions.output[0],
    output:
        **{
            name: report(
                f"{RES}/stats/{fname}",
                caption=f"../report/{name}.rst",
                category="Statistical tests",
            )
            for name, fname in STAT_FILES.items()
            if name != "summary"
        },
        summary=f"{RES}/stats/{STAT_FILES['summary']}",
    log:
        f"logs/{COHORT}/compute_statistics.log",
    conda:
        "../../envs/cohort.yaml"
    script:
        "../scripts/compute_statistics.py"


rule cohort_figures:
    input:
        rules.aggregate_cohort.output[0],
    output:
        png=[
            report(
                FIGURES[f"spaghetti_{m}"]["png"],
                caption="../report/spaghetti.rst",
                category="Figures",
                subcategory="Change over time",
                labels={"figure": "spaghetti", "metric": m},
            )
            for m in spaghetti_metrics(CASES)
        ]
        + [
            report(
                FIGURES[f"scatter_pullout_{p}"]["png"],
                caption="../report/scatter.rst",
                category="Figures",
                subcategory="Pullout strength vs BMD",
                labels={"figure": "scatter", "predictor": p},
            )
            for p in (SCATTER_PREDICTORS if PULLOUT else [])
        ],
        svg=[f["svg"] for f in FIGURES.values()],
    log:
        f"logs/{COHORT}/cohort_figures.log",
    conda:
        "../../envs/cohort.yaml"
    params:
        cases=CASES,
    script:
        "../scripts/cohort_figures.py"


rule qc_montage:
    input:
        lambda wc: scan_outputs(QC_PICTURES[wc.kind])(wc),
    output:
        png=report(
            f"{RES}/figures/qc_{{kind}}.png",
            caption="../report/qc_montage.rst",
            category="QC",
            subcategory="Montages",
            labels={"picture": "{kind}"},
        ),
        svg=f"{RES}/figures/qc_{{kind}}.svg",
    log:
        f"logs/{COHORT}/qc_montage_{{kind}}.log",
    wildcard_constraints:
        kind="|".join(QC_PICTURES),
    conda:
        "../../envs/cohort.yaml"
    params:
        timepoints=timepoints_by_months(),
        picture=lambda wc: QC_PICTURES[wc.kind],
    script:
        "../scripts/qc_montage.py"


rule summary_page:
    input:
        summary=rules.compute_statistics.output.summary,
        long=rules.aggregate_cohort.output[0],  # the screws' grades
        tables=list(rules.cohort_tables.output),
        stats=list(rules.compute_statistics.output),
        figures=rules.cohort_figures.output.png,
        qc=[f"{RES}/figures/qc_{kind}.png" for kind in QC_PICTURES],
    output:
        report(
            f"{RES}/report/summary.html",
            caption="../report/summary_page.rst",
            category="Summary",
        ),
    log:
        f"logs/{COHORT}/summary_page.log",
    conda:
        "../../envs/cohort.yaml"
    params:
        cohort=COHORT,
        tables={
            **{k: f"{RES}/tables/{v}" for k, v in TABLE_FILES.items()},
            "longitudinal": f"{RES}/tables/longitudinal.csv",
        },
        stats={k: f"{RES}/stats/{v}" for k, v in STAT_FILES.items()},
        # linked as patients/<patient>.html (rule patient_page)
        patients=sorted(SAMPLES["patient"].astype(str).unique()),
    script:
        "../scripts/summary_page.py"


rule patient_page:
    input:
        long=rules.aggregate_cohort.output[0],
        exclusions=rules.record_exclusions.output[0],
        scans=patient_page_inputs,
    output:
        report(
            f"{RES}/report/patients/{{patient}}.html",
            caption="../report/patient_page.rst",
            category="Patients",
            labels={"patient": "{patient}"},
        ),
    log:
        f"logs/{COHORT}/patient_page_{{patient}}.log",
    conda:
        "../../envs/cohort.yaml"
    params:
        cohort=COHORT,
        # the 3D scene shows the model the patient's scans were solved on (the baseline's)
        # ("": the earliest kept scan with a mesh, i.e. each scan its own without registration)
        model_timepoint=lambda w: baseline_of(w.patient) if REGISTER else "",
    script:
        "../scripts/patient_page.py"
