"""Rule accept_calibration: the calibration's gate. Fails the scan whose calibration was
refused (no phantom found, too few reference tissues, a fit below fail_r2), with the
measurements and what to change; else records the line in calibration_accepted.json."""
from qctfea.steps import imaging as steps_imaging
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_imaging.accept_calibration(
    calibration_json=sm.input[0], out_json=sm.output[0], context=context(sm.wildcards)))
