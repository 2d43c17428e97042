"""Rule register_to_baseline: follow-up onto baseline; its density on the baseline grid."""
from qctfea import steps
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps.register(
    sm.input.baseline_density, sm.input.baseline_parts, sm.input.density, sm.input.parts,
    sm.output.density, sm.output.json, sm.output.tfm, sm.output.png, sm.params.cfg,
    context(sm.wildcards), screws_path=sm.input.screws or None))
