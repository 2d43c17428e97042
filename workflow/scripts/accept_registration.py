"""Rule accept_registration: the registration's gate. Fails the follow-up whose registration
to baseline was refused (vertebra Dice or the starts' disagreement beyond the gates), with
what was tried and what to do; else records the accuracy in registration_accepted.json."""
from qctfea.steps import imaging as steps_imaging
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_imaging.accept_registration(
    registration_json=sm.input[0], out_json=sm.output[0], context=context(sm.wildcards)))
