"""Rule measure_bmd: trabecular, integral, around-screw vBMD and areal BMD."""
from qctfea import steps
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps.bmd(sm.input.density, sm.input.parts, sm.input.screws,
                               sm.output.json, sm.params.cfg, context(sm.wildcards),
                               sm.output.png))
