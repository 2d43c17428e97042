"""Rule mesh_vertebra (a checkpoint): bone + screws -> conforming tetrahedra (CGAL) with cell
tags. A vertebra that cannot be meshed is recorded (refused) for accept_mesh."""
from qctfea.steps import model as steps_model
from qctfea.workflow_glue import context, optional_input, run_step

sm = snakemake  # noqa: F821
# No screws input without pullout in loads.cases (a model without screws).
run_step(sm, lambda: steps_model.mesh(
    parts_path=sm.input.parts, screws_path=optional_input(sm, "screws"),
    out_mesh=sm.output.mesh, out_json=sm.output.json, cfg=sm.params.cfg,
    context=context(sm.wildcards), out_png=sm.output.png, record_refusal=True))
