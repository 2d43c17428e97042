"""Rule generate_demo_scan: write one synthetic scan of the demo cohort."""
from pathlib import Path

from qctfea.steps import imaging as steps_imaging
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_imaging.synth_scan(
         out_dir=Path(sm.output.dicom).parent, patient=sm.wildcards.patient,
         timepoint=sm.wildcards.timepoint, months=sm.params.months, seed=sm.params.seed,
         synth_cfg=sm.params.synth))
