"""Rule calibrate_density: HU -> K2HPO4 density (mg/cm³)."""
from qctfea import steps
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps.calibrate(
    sm.input.ct, sm.input.labels, sm.output.density, sm.output.json, sm.output.png,
    sm.params.cfg, context(sm.wildcards), sm.params.label))
