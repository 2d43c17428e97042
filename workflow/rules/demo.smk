# Synthetic demo cohort: one DICOM series (+ labels, landmarks, DXA, truth) per scan.
# Only active when the cohort config has a `demo:` section.
if "demo" in CCFG:
    from qctfea.demo.synth import generator_digest

    rule generate_demo_scan:
        output:
            dicom=directory("resources/{cohort}/{patient}/{timepoint}/dicom"),
            labels="resources/{cohort}/{patient}/{timepoint}/labels.nii.gz",
            landmarks="resources/{cohort}/{patient}/{timepoint}/landmarks.json",
            dxa="resources/{cohort}/{patient}/{timepoint}/dxa.json",
            truth="resources/{cohort}/{patient}/{timepoint}/truth.json",
        log:
            "logs/{cohort}/{patient}/{timepoint}/generate_demo_scan.log",
        benchmark:
            "benchmarks/{cohort}/{patient}/{timepoint}/generate_demo_scan.tsv"
        conda:
            "../../envs/imaging.yaml"
        params:
            months=get_months,
            seed=CCFG.get("demo", {}).get("seed", 2021),
            synth=CCFG.get("demo", {}).get("synth", {}),
            # the generator's code: a new generator regenerates the scans
            generator=generator_digest(),
        script:
            "../scripts/generate_demo_scan.py"
