"""Rule extract_vertebra: label map -> vertebral body, posterior elements, trabecular ROI."""
from qctfea import steps
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps.mask(sm.input.ct, sm.input.labels, sm.output.parts, sm.output.json,
                                sm.params.cfg, context(sm.wildcards)))
