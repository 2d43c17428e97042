"""Rule qc_montage: one per-scan QC picture kind in a patients x timepoints grid."""
from qctfea import figures
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
entries = [(p, t, f) for (p, t), f in zip(sm.params.scans, sm.input, strict=True)]
run_step(sm, lambda: figures.qc_montage(
    entries, {"png": sm.output.png, "svg": sm.output.svg},
    f"QC: {sm.wildcards.kind} (patients x timepoints)", sm.params.timepoints))
