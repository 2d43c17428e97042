"""Rule assign_materials: density -> element Young's moduli (integrated over each element)."""
from qctfea.steps import model as steps_model
from qctfea.workflow_glue import context, optional_input, run_step

sm = snakemake  # noqa: F821
# No screws input without pullout in loads.cases (a model without screws).
run_step(sm, lambda: steps_model.materials(mesh_path=sm.input.mesh, density_path=sm.input.density,
                                           screws_path=optional_input(sm, "screws"),
                                           out_npz=sm.output.npz, out_json=sm.output.json,
                                           cfg=sm.params.cfg, context=context(sm.wildcards),
                                           record_refusal=True))
