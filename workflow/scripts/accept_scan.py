"""Rule accept_scan: the inputs' gate. Fails the scan whose image or label map could not be
read, or whose label map lacks the vertebra, with the message ingest recorded; else records
the acquisition in scan_accepted.json."""
from qctfea.steps import imaging as steps_imaging
from qctfea.workflow_glue import context, run_step

sm = snakemake  # noqa: F821
run_step(sm, lambda: steps_imaging.accept_scan(
    scan_json=sm.input[0], out_json=sm.output[0], context=context(sm.wildcards)))
