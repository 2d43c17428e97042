# Cohort level: longitudinal table, statistics and figures.


rule aggregate_cohort:
    input:
        bmd=scan_outputs("bmd.json"),
        compression=scan_outputs("compression.json"),
        pullout=[f"{RES}/{p}/{t}/pullout_{s}.json" for p, t in SAMPLES.index for s in SIDES],
        mesh=scan_outputs("mesh.json"),
        calibration=scan_outputs("calibration.json"),
        dxa=get_dxa_files,
    output:
        report(f"{RES}/tables/longitudinal.csv", category="Tables"),
    params:
        samples=SAMPLES.reset_index(drop=True).to_dict("records"),
        results=RES,
    log:
        f"logs/{COHORT}/aggregate_cohort.log",
    conda:
        "../../envs/qctfea.yaml"
    script:
        "../scripts/aggregate_cohort.py"


rule compute_statistics:
    input:
        rules.aggregate_cohort.output[0],
    output:
        correlations=report(f"{RES}/stats/correlations.csv", category="Statistics"),
        changes=report(f"{RES}/stats/changes.csv", category="Statistics"),
        summary=f"{RES}/stats/summary.json",
        scatter=report(f"{RES}/stats/pullout_scatter.png", category="Figures"),
    log:
        f"logs/{COHORT}/compute_statistics.log",
    conda:
        "../../envs/qctfea.yaml"
    script:
        "../scripts/compute_statistics.py"
