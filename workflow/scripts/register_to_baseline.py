"""Rule register_to_baseline (a checkpoint): follow-up onto baseline; its density on the
baseline grid. A registration outside the gates is recorded (refused) for accept_registration."""
from qctfea.steps import imaging as steps_imaging
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_imaging.register(
         fixed_density=sm.input.baseline_density, fixed_parts=sm.input.baseline_parts,
         moving_density=sm.input.density, moving_parts=sm.input.parts,
         out_density=sm.output.density,
         out_json=sm.output.json, out_tfm=sm.output.tfm, out_png=sm.output.png, cfg=sm.params.cfg,
         context=context(sm.wildcards), screws_path=sm.input.screws or None,
         record_refusal=True))
