"""Rule plan_screws: screw trajectories from the landmarks or the vertebra mask
(planning.method), breach check."""
from qctfea import steps
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
# No landmarks input with planning.method auto: the named input is then an empty list.
run_step(sm, lambda: steps.plan_screws(sm.input.landmarks or None, sm.input.parts,
                                       sm.output[0], sm.params.cfg, context(sm.wildcards),
                                       planning=sm.params.planning))
