"""Rule measure_bmd: trabecular, integral, around-screw vBMD and areal BMD."""
from qctfea import steps
from qctfea.workflow_glue import context, optional_input, run_step

sm = snakemake  # noqa: F821
# No screws input without pullout in loads.cases (a model without screws).
run_step(sm, lambda: steps.bmd(sm.input.density, sm.input.parts, optional_input(sm, "screws"),
                               sm.output.json, sm.params.cfg, context(sm.wildcards),
                               sm.output.png))
