"""Rule generate_demo_scan: write one synthetic scan of the demo cohort."""
from pathlib import Path

from qctfea import steps
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps.synth_scan(
    Path(sm.output.dicom).parent, sm.wildcards.patient, sm.wildcards.timepoint,
    sm.params.months, sm.params.seed, sm.params.synth))
