"""Rule plan_screws: screw trajectories from the landmarks or the vertebra mask
(planning.method), Gertzbein-Robbins grading and its QC picture; a screw graded worse than
planning.max_grade fails the scan."""
from qctfea.steps import model as steps_model
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
# No landmarks input with planning.method auto: the named input is then an empty list.
run_step(sm, lambda: steps_model.plan_screws(landmarks_path=sm.input.landmarks or None,
                                             parts_path=sm.input.parts, out_json=sm.output.json,
                                             cfg=sm.params.cfg, context=context(sm.wildcards),
                                             planning=sm.params.planning, out_png=sm.output.png,
                                             record_refusal=True, level=sm.params.level))
