"""Rule assign_materials: density -> element Young's moduli (integrated over each element)."""
from qctfea import steps
from qctfea.workflow_glue import context, optional_input, run_step

sm = snakemake  # noqa: F821
# No screws input without pullout in loads.cases (a model without screws).
run_step(sm, lambda: steps.materials(sm.input.mesh, sm.input.density,
                                     optional_input(sm, "screws"), sm.output.npz,
                                     sm.output.json, sm.params.cfg, context(sm.wildcards)))
