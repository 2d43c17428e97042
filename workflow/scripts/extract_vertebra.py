"""Rule extract_vertebra (a checkpoint): label map (and optional sub-region map) ->
vertebral body, posterior elements, trabecular ROI, and the label QC record. A label map the
checks refuse is recorded (refused) for accept_vertebra."""
from qctfea.steps import vertebra as steps_vertebra
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
# Named input `subregions`: one file, or none (empty list) when the sample sheet has none.
sub = sm.input.get("subregions", [])
sub = sub if isinstance(sub, str) else (sub[0] if len(sub) else None)
run_step(sm, lambda: steps_vertebra.mask(ct_path=sm.input.ct, labels_path=sm.input.labels,
                                         out_parts=sm.output.parts, out_json=sm.output.json,
                                         cfg=sm.params.cfg, context=context(sm.wildcards),
                                         subregions_path=sub, record_refusal=True))
