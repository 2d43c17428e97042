"""Rule accept_mesh: the mesh's gate. Fails the scan whose vertebra could not be meshed
with its message; else records the mesh's size in mesh_accepted.json."""
from qctfea.steps import model as steps_model
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_model.accept_mesh(
    mesh_json=sm.input[0], out_json=sm.output[0], context=context(sm.wildcards)))
