"""Rule aggregate_cohort: per-scan JSONs -> results/<cohort>/tables/longitudinal.csv, with
each scan's clinical categories (thresholds: the cohort config's clinical section).
Scans whose screws were refused at planning are left out (listed in tables/exclusions.csv)."""
from qctfea.cohort import analysis as cohort, samples
from qctfea.workflow_glue import run_step

sm = snakemake  # noqa: F821
rows = [{**r, "dxa": samples.dxa_value(r["dxa"])} for r in sm.params.samples]
run_step(sm, lambda: cohort.aggregate(rows, sm.params.results, sm.output[0],
                                      cases=sm.params.cases,
                                      clinical_cfg=sm.params.clinical))
