"""Rule mesh_vertebra: bone + screws -> conforming tetrahedra (CGAL) with cell tags."""
from qctfea import steps
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps.mesh(sm.input.parts, sm.input.screws, sm.output.mesh, sm.output.json,
                                sm.params.cfg, context(sm.wildcards), sm.output.png))
