"""Rule plan_screws: screw trajectories from the landmarks, breach check."""
from qctfea import steps
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps.plan_screws(sm.input.landmarks, sm.input.parts, sm.output[0],
                                       sm.params.cfg, context(sm.wildcards)))
