"""Rule accept_strength: the solve stage's gate. Fails the scan when a load case's
force-displacement curve did not reach its peak (no strength), naming the scan, load case,
reason and what to do; else records the strengths in strength.json."""
from qctfea.steps import fea as steps_fea
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_fea.accept_strength(result_paths=list(sm.input), out_json=sm.output[0],
                                               context=context(sm.wildcards)))
