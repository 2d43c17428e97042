"""Rule assign_materials: density -> element Young's moduli (integrated over each element)."""
from qctfea import steps
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps.materials(sm.input.mesh, sm.input.density, sm.input.screws,
                                     sm.output.npz, sm.output.json, sm.params.cfg,
                                     context(sm.wildcards)))
