# Intervals of every scan's vBMD and strengths, and the per-scan SDs behind the least
# significant change (uncertainty.enabled; docs/uncertainty.md). Runs after the solve gate:
# nothing is computed for a scan whose strength was refused.


rule estimate_uncertainty:
    input:
        calibration=f"{RES}/{{patient}}/{{timepoint}}/calibration.json",
        bmd=f"{RES}/{{patient}}/{{timepoint}}/bmd.json",
        density=model_density,
        parts=model_file("vertebra.nii.gz"),
        strength=f"{RES}/{{patient}}/{{timepoint}}/strength.json",
        screws=model_screws,
        registration=registration_record,
    output:
        json=f"{RES}/{{patient}}/{{timepoint}}/uncertainty.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/estimate_uncertainty.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/estimate_uncertainty.tsv"
    conda:
        "../../envs/imaging.yaml"
    resources:
        mem_mb=scan_mem("uncertainty"),
    params:
        cfg=CCFG.get("uncertainty") or {},
        materials=CCFG.get("materials") or {},
        bmd=CCFG.get("bmd") or {},
    script:
        "../scripts/estimate_uncertainty.py"
