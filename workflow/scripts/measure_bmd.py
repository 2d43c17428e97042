"""Rule measure_bmd: trabecular, integral, around-screw vBMD and areal BMD."""
from qctfea.steps import imaging as steps_imaging
from qctfea.workflow_glue import context, optional_input, run_step

sm = snakemake  # noqa: F821
# No screws input without pullout in loads.cases (a model without screws).
run_step(sm, lambda: steps_imaging.bmd(density_path=sm.input.density, parts_path=sm.input.parts,
                                       screws_path=optional_input(sm, "screws"),
                                       out_json=sm.output.json,
                                       cfg=sm.params.cfg, context=context(sm.wildcards),
                                       out_png=sm.output.png, record_refusal=True))
