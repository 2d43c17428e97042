# Imaging: ingest, calibrate, mask, screws, BMD (one job per patient x timepoint).


# A checkpoint: a scan whose image or label map cannot be read, or whose label map lacks the
# vertebra, still gets its scan.json (with the refusal) and a placeholder image, so that the
# cohort tables can be built without it (--keep-going); rule accept_scan then fails the scan
# with the message.
checkpoint ingest_scan:
    input:
        image=get_image,
        labels=get_labels,
    output:
        image=f"{RES}/{{patient}}/{{timepoint}}/ct.nii.gz",
        json=f"{RES}/{{patient}}/{{timepoint}}/scan.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/ingest_scan.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/ingest_scan.tsv"
    conda:
        "../../envs/imaging.yaml"
    resources:
        mem_mb=scan_mem("ingest"),
    params:
        cfg=CCFG.get("ingest", {}),
        mask=CCFG.get("mask", {}),
        series_uid=get_series_uid,
    script:
        "../scripts/ingest_scan.py"


rule accept_scan:
    input:
        rules.ingest_scan.output.json,
    output:
        f"{RES}/{{patient}}/{{timepoint}}/scan_accepted.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/accept_scan.log",
    # a gate reads one JSON record: run by Snakemake itself, also on a cluster
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    script:
        "../scripts/accept_scan.py"


# A checkpoint: a calibration refused by its gates (no phantom found, too few tissues, a
# fit below fail_r2) still gets its calibration.json (with the refusal) and picture, and a
# density without numbers, so that the cohort tables can be built without the scan
# (--keep-going); rule accept_calibration then fails the scan with the message.
checkpoint calibrate_density:
    input:
        unpack(baseline_energy_inputs),  # a follow-up's: its baseline's effective energy
        ct=rules.ingest_scan.output.image,
        labels=get_labels,
        accepted=rules.accept_scan.output,  # the inputs' gate: nothing runs on a refused scan
    output:
        density=f"{RES}/{{patient}}/{{timepoint}}/density.nii.gz",
        json=f"{RES}/{{patient}}/{{timepoint}}/calibration.json",
        png=report(
            f"{RES}/{{patient}}/{{timepoint}}/calibration.png",
            caption="../report/calibration.rst",
            category="QC",
            subcategory="Calibration",
            labels={"patient": "{patient}", "timepoint": "{timepoint}"},
        ),
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/calibrate_density.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/calibrate_density.tsv"
    conda:
        "../../envs/imaging.yaml"
    resources:
        mem_mb=scan_mem("calibrate"),
    params:
        cfg=CCFG.get("calibration", {}),
        label=target().label,
        convention=target().convention,
    script:
        "../scripts/calibrate_density.py"


rule accept_calibration:
    input:
        rules.calibrate_density.output.json,
    output:
        f"{RES}/{{patient}}/{{timepoint}}/calibration_accepted.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/accept_calibration.log",
    # a gate reads one JSON record: run by Snakemake itself, also on a cluster
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    script:
        "../scripts/accept_calibration.py"


# A checkpoint: a label map the checks refuse (the vertebra cut by the field of view, a label
# map off its CT, no body found) still gets its vertebra.json (with the refusal) and a
# placeholder parts image, so that the cohort tables can be built without the scan
# (--keep-going); rule accept_vertebra then fails the scan with the message.
checkpoint extract_vertebra:
    input:
        ct=rules.ingest_scan.output.image,
        labels=get_labels,
        accepted=rules.accept_scan.output,  # the inputs' gate
        subregions=get_subregions,  # [] when the sample sheet names none
    output:
        parts=f"{RES}/{{patient}}/{{timepoint}}/vertebra.nii.gz",
        json=f"{RES}/{{patient}}/{{timepoint}}/vertebra.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/extract_vertebra.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/extract_vertebra.tsv"
    conda:
        "../../envs/imaging.yaml"
    resources:
        mem_mb=scan_mem("mask"),
    params:
        cfg=CCFG.get("mask", {}),
    script:
        "../scripts/extract_vertebra.py"


rule accept_vertebra:
    input:
        rules.extract_vertebra.output.json,
    output:
        f"{RES}/{{patient}}/{{timepoint}}/vertebra_accepted.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/accept_vertebra.log",
    # a gate reads one JSON record: run by Snakemake itself, also on a cluster
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    script:
        "../scripts/accept_vertebra.py"


# A checkpoint: a scan whose screws are refused (graded worse than planning.max_grade) still
# gets its screws.json (with the refusal) and picture, so that the cohort tables can be built
# without it (--keep-going); rule accept_screws then fails that scan with the message.
checkpoint plan_screws:
    input:
        landmarks=get_landmarks,
        parts=rules.extract_vertebra.output.parts,
        vertebra=vertebra_accepted,  # the label map's gate
    output:
        json=f"{RES}/{{patient}}/{{timepoint}}/screws.json",
        png=report(
            f"{RES}/{{patient}}/{{timepoint}}/screws.png",
            caption="../report/screws.rst",
            category="QC",
            subcategory="Screw placement",
            labels={"patient": "{patient}", "timepoint": "{timepoint}"},
        ),
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/plan_screws.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/plan_screws.tsv"
    conda:
        "../../envs/imaging.yaml"
    resources:
        mem_mb=scan_mem("screws"),
    params:
        cfg=CCFG.get("screw", {}),
        planning=CCFG.get("planning", {}),
        level=target().vertebra,  # the level's trajectory range (L5 converges more)
    script:
        "../scripts/plan_screws.py"


rule accept_screws:
    input:
        rules.plan_screws.output.json,
    output:
        f"{RES}/{{patient}}/{{timepoint}}/placement.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/accept_screws.log",
    # a gate reads one JSON record: run by Snakemake itself, also on a cluster
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    script:
        "../scripts/accept_screws.py"


# A checkpoint, like plan_screws: a follow-up that cannot be registered within the gates
# still gets its registration.json (with the refusal), picture and density, so that the
# cohort tables can be built without it (--keep-going); rule accept_registration then fails
# that scan with the message.
checkpoint register_to_baseline:
    input:
        baseline_density=model_file("density.nii.gz"),
        baseline_parts=model_file("vertebra.nii.gz"),
        density=rules.calibrate_density.output.density,
        parts=rules.extract_vertebra.output.parts,
        # the baseline's screws: the registration's accuracy is reported at their entry and
        # tip (none without pullout: the vertebra's box corners)
        screws=model_screws,
        accepted=model_accepted,
        calibrated=calibration_accepted,  # the calibration gates (this scan, its baseline)
        vertebra=vertebra_accepted,  # the label maps' gates (this scan, its baseline)
    output:
        density=f"{RES}/{{patient}}/{{timepoint}}/density_baseline.nii.gz",
        json=f"{RES}/{{patient}}/{{timepoint}}/registration.json",
        tfm=f"{RES}/{{patient}}/{{timepoint}}/registration.tfm",
        png=report(
            f"{RES}/{{patient}}/{{timepoint}}/registration.png",
            caption="../report/registration.rst",
            category="QC",
            subcategory="Registration",
            labels={"patient": "{patient}", "timepoint": "{timepoint}"},
        ),
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/register_to_baseline.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/register_to_baseline.tsv"
    conda:
        "../../envs/imaging.yaml"
    resources:
        mem_mb=scan_mem("registration"),
    params:
        cfg=CCFG.get("registration", {}),
    script:
        "../scripts/register_to_baseline.py"


rule accept_registration:
    input:
        rules.register_to_baseline.output.json,
    output:
        f"{RES}/{{patient}}/{{timepoint}}/registration_accepted.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/accept_registration.log",
    # a gate reads one JSON record: run by Snakemake itself, also on a cluster
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    script:
        "../scripts/accept_registration.py"


rule measure_bmd:
    input:
        # Follow-ups: their density on the baseline grid, measured in the baseline's ROIs.
        density=model_density,
        parts=model_file("vertebra.nii.gz"),
        screws=model_screws,  # none without pullout: no around-screw vBMD
        accepted=model_accepted,  # the planning gate: nothing is measured on refused screws
        registered=registration_accepted,  # the registration gate (follow-ups)
        calibrated=calibration_accepted,  # the calibration gates (this scan, its baseline)
        vertebra=vertebra_accepted,  # the label maps' gates (this scan, its baseline)
    output:
        json=f"{RES}/{{patient}}/{{timepoint}}/bmd.json",
        png=report(
            f"{RES}/{{patient}}/{{timepoint}}/roi.png",
            caption="../report/roi.rst",
            category="QC",
            subcategory="BMD regions",
            labels={"patient": "{patient}", "timepoint": "{timepoint}"},
        ),
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/measure_bmd.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/measure_bmd.tsv"
    conda:
        "../../envs/imaging.yaml"
    resources:
        mem_mb=scan_mem("bmd"),
    params:
        cfg=CCFG.get("bmd", {}),
    script:
        "../scripts/measure_bmd.py"
