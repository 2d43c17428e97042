# Reads and validates the cohort config and sample sheet once; input functions.
import json
from pathlib import Path

import yaml
from snakemake.utils import validate

from qctfea.samples import read_sample_sheet

COHORT = config["cohort"]
COHORT_DIR = Path(config.get("cohorts_dir", "config/cohorts")) / COHORT
if not (COHORT_DIR / "config.yaml").is_file():
    raise ValueError(
        f"cohort '{COHORT}': {COHORT_DIR}/config.yaml not found; create it or choose one of "
        f"{sorted(p.name for p in COHORT_DIR.parent.iterdir() if p.is_dir())}"
    )
CCFG = yaml.safe_load((COHORT_DIR / "config.yaml").read_text()) or {}
validate(CCFG, "../schemas/cohort.schema.yaml")
SAMPLES = read_sample_sheet(COHORT_DIR / CCFG.get("samples", "samples.tsv"))
SAMPLES = SAMPLES.set_index(["patient", "timepoint"], drop=False)
RES = f"results/{COHORT}"
TASKS = int(CCFG.get("mpi", {}).get("tasks", 1))
SIDES = ["left", "right"]


wildcard_constraints:
    patient="[A-Za-z0-9_-]+",
    timepoint="[A-Za-z0-9_-]+",
    side="left|right",
    cohort="[A-Za-z0-9_-]+",


def section(name):
    """A cohort config section as a JSON string for the step's --params."""
    return json.dumps(CCFG.get(name) or {})


def sample(wildcards, column):
    return SAMPLES.loc[(wildcards.patient, wildcards.timepoint), column]


def get_image(wildcards):
    return sample(wildcards, "image")


def get_labels(wildcards):
    return sample(wildcards, "labels")


def get_landmarks(wildcards):
    return sample(wildcards, "landmarks")


def get_months(wildcards):
    return float(sample(wildcards, "months"))


def get_dxa_files(wildcards):
    """DXA cells that are files become inputs of the aggregation."""
    return [v for v in SAMPLES["dxa"] if v and not v.replace(".", "", 1).isdigit()]


def scan_outputs(name):
    return [f"{RES}/{p}/{t}/{name}" for p, t in SAMPLES.index]


def get_final_outputs(wildcards):
    return [
        f"{RES}/tables/longitudinal.csv",
        f"{RES}/stats/correlations.csv",
        f"{RES}/stats/changes.csv",
        f"{RES}/stats/summary.json",
        f"{RES}/report/summary.html",
    ]
