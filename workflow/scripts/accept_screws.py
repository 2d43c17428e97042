"""Rule accept_screws: the planning stage's gate. Fails the scan whose screws were refused
(graded worse than planning.max_grade), naming the scan, side, grade, breach and what to do;
else records the grades in placement.json."""
from qctfea.steps import model as steps_model
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_model.accept_screws(screws_path=sm.input[0], out_json=sm.output[0],
                                               context=context(sm.wildcards)))
