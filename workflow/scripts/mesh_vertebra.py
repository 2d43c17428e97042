"""Rule mesh_vertebra: bone + screws -> conforming tetrahedra (CGAL) with cell tags."""
from qctfea import steps
from qctfea.workflow_glue import context, optional_input, run_step

sm = snakemake  # noqa: F821
# No screws input without pullout in loads.cases (a model without screws).
run_step(sm, lambda: steps.mesh(sm.input.parts, optional_input(sm, "screws"), sm.output.mesh,
                                sm.output.json, sm.params.cfg, context(sm.wildcards),
                                sm.output.png))
