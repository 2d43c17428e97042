"""Rule accept_vertebra: the label map's gate. Fails the scan whose vertebra the mask step
refused (cut by the field of view, a label map off its CT, no body found) with its message;
else records the volumes in vertebra_accepted.json."""
from qctfea.steps import vertebra as steps_vertebra
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_vertebra.accept_vertebra(
    vertebra_json=sm.input[0], out_json=sm.output[0], context=context(sm.wildcards)))
