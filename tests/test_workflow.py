"""The Snakemake workflow: dry-run expansion, and one end-to-end run on a tiny cohort."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import pixels
import pytest
import SimpleITK as sitk

from conftest import REPO, run, venv_bin


PER_SCAN = ["generate_demo_scan", "ingest_scan", "accept_scan", "calibrate_density",
            "accept_calibration", "extract_vertebra", "accept_vertebra", "measure_bmd", "assign_materials", "accept_strength", "estimate_uncertainty",
            "export_slicer"]
#: The FE model (screws, mesh) is built once per patient, at baseline; follow-ups are
#: registered to it (registration.enabled, the default).
PER_PATIENT = ["plan_screws", "accept_screws", "mesh_vertebra", "accept_mesh", "patient_page"]


def _job_counts(cohorts_dir, cohort, workdir):
    p = run([venv_bin("snakemake"), "-n", "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(workdir), "--configfile", str(REPO / "config" / "config.yaml"), "--config", f"cohort={cohort}",
             f"cohorts_dir={cohorts_dir}"], cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = p.stdout + p.stderr
    table = text[text.index("Job stats:"):]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M))
    return {k: int(v) for k, v in counts.items()}


def _cohort(tmp, name, n_patients, timepoints=(("M00", 0), ("M12", 12))):
    from qctfea.cohort.samples import demo_sheet

    d = tmp / "cohorts" / name
    d.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "cohorts" / "tiny" / "config.yaml", d / "config.yaml")
    demo_sheet([f"P{i:02d}" for i in range(1, n_patients + 1)], dict(timepoints),
               f"resources/{name}").to_csv(d / "samples.tsv", sep="\t", index=False)
    return tmp / "cohorts"


@pytest.fixture(scope="module")
def two_patient_counts(tmp_path_factory) -> dict:
    """Job counts of a dry run of the tiny cohort with 2 patients x 2 timepoints."""
    tmp = tmp_path_factory.mktemp("dry-two")
    return _job_counts(_cohort(tmp, "c", 2), "c", tmp)


def test_dry_run_expands_patients_x_timepoints(two_patient_counts, tmp_path):
    two = two_patient_counts
    cd = _cohort(tmp_path / "b", "c", 3)
    three = _job_counts(cd, "c", tmp_path / "b")
    for rule in PER_SCAN:
        assert two[rule] == 4 and three[rule] == 6, rule
    for rule in PER_PATIENT:
        assert two[rule] == 2 and three[rule] == 3, rule
    assert two["register_to_baseline"] == 2 and three["register_to_baseline"] == 3
    # one solve job per load case: compression and pullout left/right
    assert two["solve"] == 12 and three["solve"] == 18
    assert two["aggregate_cohort"] == three["aggregate_cohort"] == 1
    # One more patient adds only that patient's jobs and nothing else: 2 scans (each its
    # per-scan jobs and 3 solves), its model's jobs and 1 registration with its gate.
    assert three["total"] - two["total"] == 2 * (len(PER_SCAN) + 3) + len(PER_PATIENT) + 2


def test_uncertainty_disabled_has_no_uncertainty_jobs(two_patient_counts, tmp_path):
    """uncertainty.enabled: false: no estimate_uncertainty job (one per scan with it on),
    and every other job as with it on."""
    import yaml

    on = two_patient_counts
    cd = _cohort(tmp_path / "off", "c", 2)
    cfg = yaml.safe_load((cd / "c" / "config.yaml").read_text())
    cfg["uncertainty"] = {**(cfg.get("uncertainty") or {}), "enabled": False}
    (cd / "c" / "config.yaml").write_text(yaml.safe_dump(cfg))
    off = _job_counts(cd, "c", tmp_path / "off")
    assert on["estimate_uncertainty"] == 4 and "estimate_uncertainty" not in off
    assert {k: v for k, v in on.items() if k not in ("estimate_uncertainty", "total")} == \
        {k: v for k, v in off.items() if k != "total"}
    assert on["total"] - off["total"] == 4


def test_study_cohort_dry_run_lists_63_scans(tmp_path):
    """21 patients x 3 timepoints: every per-scan job 63 times, pullout twice per scan."""
    counts = _job_counts(REPO / "config" / "cohorts", "demo-study", tmp_path)
    for rule in PER_SCAN:
        assert counts[rule] == 63, rule
    for rule in PER_PATIENT:
        assert counts[rule] == 21, rule
    assert counts["register_to_baseline"] == counts["accept_registration"] == 42
    assert counts["solve"] == 63 * 3


def test_lint_is_clean():
    """`snakemake --lint` from the repository root prints no lints."""
    for extra in ([], ["--config", "cohort=demo-study"]):
        p = run([venv_bin("snakemake"), "--lint", *extra], cwd=REPO, timeout=300)
        out = p.stdout + p.stderr
        assert p.returncode == 0 and "Lints for" not in out, out[-4000:]
        assert "Congratulations, your workflow is in a good condition!" in out


def test_snakefmt_is_clean():
    """`snakefmt --check` (pinned in requirements.txt, line length in pyproject.toml) finds
    nothing to reformat in the Snakefile and workflow/rules; `snakefmt Snakefile
    workflow/rules` formats them."""
    p = run([venv_bin("snakefmt"), "--check", "--compact-diff", "Snakefile", "workflow/rules"],
            cwd=REPO, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"run `snakefmt Snakefile workflow/rules`:\n{out[-4000:]}"
    assert "would be changed" not in out and "left unchanged" in out, out[-4000:]


def _dry_run_error(tmp_path, edit):
    """Dry-run a copy of the tiny cohort after edit(cohort_dir); the failure message."""
    cd = _cohort(tmp_path, "bad", 2)
    edit(cd / "bad")
    p = run([venv_bin("snakemake"), "-n", "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"),
             "--config", "cohort=bad", f"cohorts_dir={cd}"], cwd=REPO, timeout=300)
    assert p.returncode != 0
    return p.stdout + p.stderr


def test_sample_sheet_errors_name_line_and_column(tmp_path):
    def edit(d):
        sheet = d / "samples.tsv"
        lines = sheet.read_text().splitlines()
        header = lines[0].split("\t")
        row = lines[2].split("\t")  # line 3 of the file: P01 M12
        row[header.index("months")] = "twelve"
        row[header.index("patient")] = "P 01"
        lines[2] = "\t".join(row)
        lines[4] = "\t".join(c if h != "landmarks" else "" for h, c in
                             zip(header, lines[4].split("\t")))
        sheet.write_text("\n".join(lines) + "\n")

    msg = _dry_run_error(tmp_path, edit)
    assert "invalid cohort input" in msg, msg[-3000:]
    assert "samples.tsv, line 3, column months: 'twelve'" in msg, msg[-3000:]
    assert "samples.tsv, line 3, column patient: 'P 01'" in msg, msg[-3000:]
    assert "samples.tsv, line 5, column landmarks" in msg, msg[-3000:]
    assert "line 2," not in msg and "line 4," not in msg  # the good rows are not blamed


def test_cohort_config_errors_name_the_key(tmp_path):
    def edit(d):
        cfg = (d / "config.yaml").read_text()
        (d / "config.yaml").write_text(cfg + "meshh:\n  voxel_mm: 0.5\nmpi:\n  tasks: two\n")

    msg = _dry_run_error(tmp_path, edit)
    assert "config.yaml, key meshh: unknown key; allowed:" in msg, msg[-3000:]
    assert "config.yaml, key mpi.tasks: 'two' is not of type 'integer'" in msg, msg[-3000:]


def _tiny_args(workdir, cd):
    return ["--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(REPO / "config" / "config.yaml"), "--config", "cohort=tiny",
            f"cohorts_dir={cd}"]


def _keep_going(tmp_path, cd, targets=()) -> list[str]:
    """`snakemake --keep-going` on the tiny cohort in ``tmp_path`` (``targets``, else every
    output), which must fail: the lines of its logs/tiny/failures.txt."""
    p = run([venv_bin("snakemake"), "--cores", "2", "--keep-going", *_tiny_args(tmp_path, cd),
             *(["--", *targets] if targets else [])], cwd=REPO, timeout=1500)
    assert p.returncode != 0
    return (tmp_path / "logs/tiny/failures.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny cohort (2 patients x 2 timepoints) through every rule, uninterrupted, by
    `.venv/bin/snakemake` with the environment not on PATH (not activated): the jobs find
    qctfea and mpiexec all the same (workflow/rules/common.smk)."""
    work = tmp_path_factory.mktemp("tiny")
    cd = _cohort(work, "tiny", 2)
    p = run([venv_bin("snakemake"), "--cores", "2", *_tiny_args(work, cd),
             "--show-failed-logs"], env_on_path=False, cwd=REPO, timeout=1500)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    (work / "snakemake_output.txt").write_text(p.stdout + p.stderr, encoding="utf-8")
    return work


@pytest.mark.slow
def test_a_local_run_schedules_without_snakemake_s_job_rate_limiter(tiny_run):
    """The Snakefile's onstart handler found the installed Snakemake's rate limiter and
    turned it off (its re-evaluation timers multiply while jobs wait for cores:
    qctfea.workflow_glue.without_job_rate_limit); a Snakemake that renamed what it sets
    fails here instead of silently spinning again. A cluster run keeps the limiter."""
    from types import SimpleNamespace

    from qctfea.workflow_glue import without_job_rate_limit

    out = (tiny_run / "snakemake_output.txt").read_text(encoding="utf-8")
    assert "job-rate limiter off" in out, out[-2000:]
    limiter = object()
    cluster = SimpleNamespace(local_exec=False,
                              scheduler=SimpleNamespace(job_rate_limiter=limiter))
    assert not without_job_rate_limit(cluster)
    assert cluster.scheduler.job_rate_limiter is limiter
    local = SimpleNamespace(local_exec=True,
                            scheduler=SimpleNamespace(job_rate_limiter=limiter))
    assert without_job_rate_limit(local) and local.scheduler.job_rate_limiter is None


@pytest.mark.slow
def test_end_to_end_tiny_cohort(tiny_run):
    """2 patients x 2 timepoints through every rule, solves on 2 MPI ranks."""
    tmp_path = tiny_run
    res = tmp_path / "results" / "tiny"
    df = pd.read_csv(res / "tables" / "longitudinal.csv")
    assert len(df) == 4
    for col in ("trabecular_vbmd_mg_cm3", "around_screw_vbmd_left_mg_cm3", "areal_bmd_g_cm2",
                "compression_stiffness_n_per_mm", "compression_strength_n",
                "pullout_strength_left_n", "pullout_strength_right_n", "mesh_cells",
                "compression_iterations"):
        assert df[col].notna().all(), col
    # Treatment-like gains: every patient's trabecular vBMD rises from M00 to M12.
    w = df.pivot(index="patient", columns="timepoint", values="trabecular_vbmd_mg_cm3")
    assert (w["M12"] > w["M00"]).all()
    corr = pd.read_csv(res / "stats" / "correlations.csv")
    assert {"r", "p"} <= set(corr.columns)
    changes = pd.read_csv(res / "stats" / "changes.csv")
    assert (changes["n_pairs"] == 2).all()
    # Against the generator's truth (read only here, never by the workflow): calibration
    # slope within 1 %, trabecular vBMD within 2 mg/cm³, follow-ups registered to baseline
    # within 0.5 mm and 0.5 degrees of the true change of position.
    from qctfea.demo.validation import GATES, validate_cohort

    val = validate_cohort(res, tmp_path / "resources" / "tiny", df[["patient", "timepoint",
                                                                     "months"]])
    print(val.to_string())
    assert val["registration_max_error_mm"].notna().sum() == 2
    for col, gate in GATES.items():
        assert (val[col].dropna().abs() <= gate).all(), col
    # Follow-ups use the baseline model: same mesh, no mesh of their own.
    assert (df.groupby("patient")["mesh_cells"].nunique() == 1).all()
    assert not list(res.glob("*/M12/mesh.xdmf"))
    # Each model's 3D Slicer files (rule export_slicer): the markups read back as landmarks
    # give each screw's entry and tip of screws.json
    from qctfea.qc.slicer import read_landmarks_markups

    for patient in ("P01", "P02"):
        model = res / patient / "M00"
        back = read_landmarks_markups(model / "slicer" / "screws.mrk.json")
        for s in json.loads((model / "screws.json").read_text())["screws"]:
            np.testing.assert_allclose(back[s["side"]]["entry_mm"], s["entry_mm"], atol=1e-6)
            np.testing.assert_allclose(back[s["side"]]["target_mm"], s["tip_mm"], atol=1e-6)
        for name in ("vertebra.stl", "screw_left.stl", "screw_right.stl"):
            assert (model / "slicer" / name).read_bytes()[80:84] != b"\0\0\0\0", name
    # ...and each follow-up's: the baseline's screws where its registration puts them in the
    # follow-up's scanner coordinates (registration.tfm: baseline points to follow-up points)
    for patient in ("P01", "P02"):
        tx = sitk.ReadTransform(str(res / patient / "M12" / "registration.tfm"))
        back = read_landmarks_markups(res / patient / "M12" / "slicer" / "screws.mrk.json")
        for s in json.loads((res / patient / "M00" / "screws.json").read_text())["screws"]:
            for key, got in (("entry_mm", "entry_mm"), ("tip_mm", "target_mm")):
                np.testing.assert_allclose(back[s["side"]][got], tx.TransformPoint(s[key]),
                                           atol=1e-6)
    # No DICOM identifiers (planted by the generator in every header) in any file the
    # workflow wrote: results, logs, benchmarks, Snakemake's own log; .gz files decompressed.
    import gzip

    import pydicom

    identifiers = set()
    for d in sorted((tmp_path / "resources" / "tiny").glob("*/*/dicom")):
        ds = pydicom.dcmread(next(d.iterdir()))
        identifiers |= {str(ds.PatientName), ds.PatientName.family_name, str(ds.PatientID),
                        ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName,
                        str(ds.ReferringPhysicianName)}
    assert len(identifiers) >= 7 * 2 - 2  # each patient's own name, id, accession number
    searched = 0
    for root in ("results", "logs", "benchmarks", ".snakemake/log"):
        for f in (tmp_path / root).rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                if f.suffix == ".gz":
                    data = gzip.decompress(data)
                for ident in identifiers:
                    assert ident.encode() not in data, (f, ident)
                searched += 1
    assert searched > 100


def test_keep_going_isolates_a_bad_scan_and_names_it(tiny_run, tmp_path):
    """With --keep-going one scan whose image folder holds no DICOM fails only its own jobs
    at the inputs' gate (ingest_scan records the refusal, accept_scan fails with it); the
    other scan completes, and logs/<cohort>/failures.txt names the scan and its error.
    The generated scans are the tiny run's (the same generator settings)."""
    cd = _cohort(tmp_path, "kg", 2, timepoints=(("M00", 0),))
    for patient in ("P01", "P02"):
        shutil.copytree(tiny_run / "resources" / "tiny" / patient / "M00",
                        tmp_path / "resources" / "kg" / patient / "M00")
    bad = tmp_path / "not-a-series"
    bad.mkdir()
    (bad / "notes.txt").write_text("not DICOM\n")
    sheet = cd / "kg" / "samples.tsv"
    df = pd.read_csv(sheet, sep="\t", dtype=str)
    df.loc[df["patient"] == "P02", "image"] = str(bad)
    df.to_csv(sheet, sep="\t", index=False)
    targets = [f"results/kg/{p}/M00/bmd.json" for p in ("P01", "P02")]
    p = run([venv_bin("snakemake"), "--cores", "2", "--keep-going", "--snakefile",
             str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
             str(REPO / "config" / "config.yaml"), "--config", "cohort=kg",
             f"cohorts_dir={cd}", "--", *targets], cwd=REPO, timeout=600)
    assert p.returncode != 0
    assert (tmp_path / targets[0]).is_file()  # the good scan went all the way
    record = json.loads((tmp_path / "results/kg/P02/M00/scan.json").read_text())
    assert "no DICOM image slices found" in record["refused"] and "scan" not in record
    # nothing ran on the refused scan after its gate
    assert not list((tmp_path / "results/kg/P02/M00").glob("density*"))
    assert not (tmp_path / "results/kg/P02/M00/vertebra.nii.gz").exists()
    lines = (tmp_path / "logs/kg/failures.txt").read_text().splitlines()
    assert lines[0].startswith("1 failed job(s)"), lines
    assert lines[1].startswith("patient P02, timepoint M00: rule accept_scan: ERROR: ")
    assert str(bad) in lines[1] and "no DICOM image slices found" in lines[1]
    assert "failures (logs/kg/failures.txt)" in p.stderr
    assert not list((tmp_path / "results").rglob("*.part*")), "half-written files left"


def _copy_preparation(scan, dest) -> None:
    """A finished scan's results up to the solves' inputs (not the solves' outputs, the
    strength gate's or the uncertainty's), timestamps kept: Snakemake takes them as done."""
    dest.mkdir(parents=True)
    for f in scan.iterdir():
        if f.is_dir():  # slicer/: the model's 3D Slicer export
            shutil.copytree(f, dest / f.name)
        elif not f.name.startswith(("compression", "pullout_", "strength", "uncertainty")):
            shutil.copy2(f, dest / f.name)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(tiny_run, tmp_path):
    """kill -9 of the whole workflow while solves are running leaves nothing that looks
    finished; the rerun (--rerun-incomplete) gives the uninterrupted run's tables.

    The scans and their preparation (every result up to the solves' inputs) are copied from
    the uninterrupted run with their timestamps, so the killed run starts at the solves."""
    cd = _cohort(tmp_path, "tiny", 2)
    shutil.copytree(tiny_run / "resources", tmp_path / "resources")
    for scan in sorted((tiny_run / "results" / "tiny").glob("P*/M*")):
        _copy_preparation(scan, tmp_path / scan.relative_to(tiny_run))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([venv_bin("snakemake"), "--cores", "2", *_tiny_args(tmp_path, cd)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    logs = tmp_path / "logs" / "tiny"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        running = [f for f in logs.rglob("*.log")
                   if f.name.startswith(("mesh_vertebra", "solve_"))] if logs.exists() else []
        if any(f.name.startswith("solve_") for f in running):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    assert proc.poll() is None, "the workflow ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = tmp_path / "results" / "tiny"
    assert not (res / "tables" / "longitudinal.csv").exists()
    # Outputs of the jobs that were running are either absent or under temporary names.
    for f in res.rglob("*.json"):
        json_text = f.read_text()
        assert json_text.rstrip().endswith("}"), f"truncated {f}"
    # What a user does after a killed run: release Snakemake's lock, rerun what is incomplete.
    p = run([venv_bin("snakemake"), "--unlock", *_tiny_args(tmp_path, cd)], cwd=REPO,
            timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run([venv_bin("snakemake"), "--cores", "2", "--rerun-incomplete",
             *_tiny_args(tmp_path, cd)], cwd=REPO, timeout=1500)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    for rel in ("tables/longitudinal.csv", "stats/changes.csv", "stats/correlations.csv",
                "tables/wide.csv"):
        a = (tiny_run / "results" / "tiny" / rel).read_bytes()
        b = (res / rel).read_bytes()
        assert a == b, f"{rel} differs from the uninterrupted run"


def _p02_landmarks(cd, tmp_path, name: str, change) -> None:
    """P02's landmarks (the generator's), changed in place by ``change(lm)``, written to
    ``name`` and to its row of the cohort's sample sheet."""
    from qctfea.demo.synth import SynthParams, landmarks_world, patient_anatomy, scan_pose

    lm = landmarks_world(patient_anatomy(11, "P02", SynthParams()),
                         scan_pose(11, "P02", 0.0, SynthParams()))
    change(lm)
    bad = tmp_path / name
    bad.write_text(json.dumps(lm))
    sheet = cd / "tiny" / "samples.tsv"
    df = pd.read_csv(sheet, sep="\t", dtype=str)
    df.loc[df["patient"] == "P02", "landmarks"] = str(bad)
    df.to_csv(sheet, sep="\t", index=False)


def _p02_screw_through_the_canal(cd, tmp_path) -> None:
    """P02's left screw moved 9 mm medially (through the spinal canal)."""

    def change(lm):
        towards_right = np.subtract(lm["right"]["entry_mm"], lm["left"]["entry_mm"])
        shift = 9.0 * towards_right / np.linalg.norm(towards_right)
        for key in ("entry_mm", "target_mm"):
            lm["left"][key] = (np.array(lm["left"][key]) + shift).tolist()

    _p02_landmarks(cd, tmp_path, "P02_canal_landmarks.json", change)


def _p02_landmarks_of_another_scan(cd, tmp_path) -> None:
    """P02's landmarks 100 mm higher, as the landmarks of another scan with another table
    position: neither screw enters the vertebra."""

    def change(lm):
        for side in ("left", "right"):
            for key in ("entry_mm", "target_mm"):
                lm[side][key] = (np.array(lm[side][key]) + [0.0, 0.0, 100.0]).tolist()

    _p02_landmarks(cd, tmp_path, "P02_other_landmarks.json", change)


def test_keep_going_leaves_a_scan_with_a_screw_through_the_canal_out_of_the_tables(tiny_run,
                                                                                  tmp_path):
    """P02's left landmark screw runs 9 mm medially, through the spinal canal: the planning
    gate (rule accept_screws) fails that scan naming patient, timepoint, side, grade, breach
    and what to do; with --keep-going P01 goes on to the solves and the tables, the tables
    hold P01 only with its screws' grades, and tables/exclusions.csv lists P02 with the
    refusal. The two baseline scans (generator output) and P01's preparation up to the
    solves' inputs are the uninterrupted tiny run's (copied with their timestamps); P02's
    preparation, with its own landmarks, runs here."""
    cd = _cohort(tmp_path, "tiny", 2, timepoints=(("M00", 0),))
    for patient in ("P01", "P02"):
        shutil.copytree(tiny_run / "resources" / "tiny" / patient / "M00",
                        tmp_path / "resources" / "tiny" / patient / "M00")
    _copy_preparation(tiny_run / "results" / "tiny" / "P01" / "M00",
                      tmp_path / "results" / "tiny" / "P01" / "M00")
    _p02_screw_through_the_canal(cd, tmp_path)
    lines = _keep_going(tmp_path, cd)
    res = tmp_path / "results" / "tiny"
    assert lines[0].startswith("1 failed job(s)"), lines
    msg = lines[1]
    assert msg.startswith("patient P02, timepoint M00: rule accept_screws: ERROR: "), msg
    for part in ("left screw grade", "mm outside the bone, medial (into the spinal canal)",
                 "planning.max_grade = B", "landmarks", "exclude"):
        assert part in msg, (part, msg)
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    assert list(long["patient"]) == ["P01"]
    assert set(long[["screw_grade_left", "screw_grade_right"]].iloc[0]) <= {"A", "B"}
    assert long["pullout_strength_left_n"].notna().all()
    excl = pd.read_csv(res / "tables" / "exclusions.csv", dtype=str)
    assert list(excl["patient"]) == ["P02"] and "screw placement refused" in excl["reason"][0]
    assert (res / "report" / "summary.html").is_file()
    assert (res / "P02" / "M00" / "screws.png").is_file()  # the picture of the refusal
    assert not (res / "P02" / "M00" / "mesh.json").exists()  # nothing ran on those screws


def test_a_cohort_whose_every_scan_is_refused_still_gets_its_summary_page(tiny_run,
                                                                         tmp_path):
    """A one-scan cohort (a lab's first real scan) whose landmarks are another scan's, so
    that no screw can be made at all (an error of the planning step itself, not a grade):
    the planning checkpoint records the error, its gate fails the scan and, with
    --keep-going, the cohort rules still make their outputs: header-only tables,
    statistics whose summary names no kept scan, and the summary page saying so, with the
    refused scan and its reason (P02 M00, from the uninterrupted tiny run's generator
    output)."""
    cd = _cohort(tmp_path, "tiny", 2, timepoints=(("M00", 0),))
    sheet = cd / "tiny" / "samples.tsv"
    _p02_landmarks_of_another_scan(cd, tmp_path)
    df = pd.read_csv(sheet, sep="\t", dtype=str)
    df[df["patient"] == "P02"].to_csv(sheet, sep="\t", index=False)
    shutil.copytree(tiny_run / "resources" / "tiny" / "P02" / "M00",
                    tmp_path / "resources" / "tiny" / "P02" / "M00")
    lines = _keep_going(tmp_path, cd)
    res = tmp_path / "results" / "tiny"
    assert lines[0].startswith("1 failed job(s)"), lines  # the planning gate only
    assert "rule accept_screws" in lines[1], lines
    for part in ("screw (entry", "does not enter the vertebra", "landmarks of another scan"):
        assert part in lines[1], (part, lines)
    assert len(pd.read_csv(res / "tables" / "longitudinal.csv")) == 0
    summary = json.loads((res / "stats" / "summary.json").read_text())
    assert summary["n_scans"] == 0 and summary["headlines"][0].startswith("No scan")
    assert [(e["patient"], e["timepoint"]) for e in summary["excluded_scans"]] == [
        ("P02", "M00")]
    page = (res / "report" / "summary.html").read_text()
    assert "No scan of this cohort was kept" in page and "does not enter the vertebra" in page
    assert (res / "report" / "patients" / "P02.html").is_file()


def test_keep_going_leaves_scans_refused_at_registration_or_peak_out_of_the_tables(tiny_run,
                                                                                   tmp_path):
    """The uninterrupted tiny run copied with its timestamps, then three records changed as
    their steps record a refusal: P02 M12's registration (register_to_baseline), P01 M12's
    compression curve without a peak (solve) and P02 M00's materials (assign_materials: a
    check of the materials step, which no gate reads before the solves). With --keep-going
    the gates (accept_registration, accept_strength) fail those scans with their messages,
    nothing after the registration gate runs for P02 M12, P02 M00's load cases record the
    materials' refusal without solving, and the tables are built from P01 M00, whose row is
    the uninterrupted run's; exclusions.csv lists the three refusals."""
    cd = _cohort(tmp_path, "tiny", 2)
    for sub in ("resources", "results"):
        shutil.copytree(tiny_run / sub, tmp_path / sub)
    res = tmp_path / "results" / "tiny"
    before = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    reg_msg = ("patient P02, timepoint M12: registration to baseline failed: vertebra Dice "
               "0.612 < 0.75 (before 0.540); look at registration.png")
    peak_msg = ("patient P01, timepoint M12, compression: peak not reached (the force still "
                "rose at the last increment). No strength is reported.")
    reg = res / "P02" / "M12" / "registration.json"
    reg.write_text(json.dumps({**json.loads(reg.read_text()), "refused": reg_msg}))
    mat_msg = ("patient P02, timepoint M00: density image density.nii.gz gives the bone "
               "elements a median density of -150.0 mg/cm³ (not > 0): the calibration is wrong")
    mat = res / "P02" / "M00" / "materials.json"
    mat.write_text(json.dumps({"refused": mat_msg}))
    comp = res / "P01" / "M12" / "compression.json"
    comp.write_text(json.dumps({**json.loads(comp.read_text()), "strength_n": None,
                                "peak_reached": False, "refused": peak_msg}))
    bmd_mtime = (res / "P02" / "M12" / "bmd.json").stat().st_mtime
    (res / "report" / "summary.html").unlink()
    # the gates and the cohort's tables and summary (not the figures and pages: time)
    targets = [f"results/tiny/{f}" for f in (
        "P02/M12/registration_accepted.json", "P01/M12/strength.json", "P02/M00/strength.json",
        "tables/longitudinal.csv", "tables/exclusions.csv", "report/summary.html")]
    lines = _keep_going(tmp_path, cd, targets)
    assert lines[0].startswith("3 failed job(s)"), lines
    first, second, third = sorted(lines[1:4])
    assert first.startswith(f"patient P01, timepoint M12: rule accept_strength: ERROR: "
                            f"{peak_msg}"), lines
    assert second == (f"patient P02, timepoint M00: rule accept_strength: ERROR: {mat_msg} "
                      "(log: logs/tiny/P02/M00/accept_strength.log)"), lines  # once
    assert third.startswith(f"patient P02, timepoint M12: rule accept_registration: ERROR: "
                            f"{reg_msg}"), lines
    for case in ("compression", "pullout_left", "pullout_right"):  # not solved
        rec = json.loads((res / "P02" / "M00" / f"{case}.json").read_text())
        assert rec["refused"] == mat_msg and rec["stop_reason"] == f"not solved: {mat_msg}"
    assert (res / "P02" / "M12" / "bmd.json").stat().st_mtime == bmd_mtime  # not rerun
    assert not (res / "P02" / "M12" / "registration_accepted.json").exists()
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    assert long[["patient", "timepoint"]].values.tolist() == [["P01", "M00"]]
    # the baseline's row as in the uninterrupted run; without a follow-up left the table
    # has no registration columns
    assert set(before.columns) - set(long.columns) == {
        "registration_dice", "registration_point_spread_mm", "registration_point_motion_max_mm"}
    kept = (before["patient"] == "P01") & (before["timepoint"] == "M00")
    pd.testing.assert_frame_equal(long, before.loc[kept, long.columns].reset_index(drop=True))
    excl = pd.read_csv(res / "tables" / "exclusions.csv", dtype=str)
    assert excl[["patient", "timepoint", "reason"]].values.tolist() == [
        ["P01", "M12", peak_msg], ["P02", "M00", mat_msg], ["P02", "M12", reg_msg]]
    assert (res / "report" / "summary.html").is_file()


def test_keep_going_records_a_crashed_solve_and_builds_the_tables_without_its_scan(
        tiny_run, tmp_path):
    """The uninterrupted tiny run copied with its timestamps, then P02 M12's materials file
    overwritten with bytes that are no numpy archive: its three load cases crash on both MPI
    ranks (an unforeseen exception, the ranks abort together). The solve rule records each
    crash as the case's refusal (`qctfea solve-failed`: the exit code and the log's last
    error); with --keep-going the solve gate fails that scan with the message and the tables
    are built from the other three scans, whose rows are the uninterrupted run's."""
    cd = _cohort(tmp_path, "tiny", 2)
    for sub in ("resources", "results"):
        shutil.copytree(tiny_run / sub, tmp_path / sub)
    res = tmp_path / "results" / "tiny"
    before = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    (res / "P02" / "M12" / "materials.npz").write_bytes(b"not a numpy archive\n" * 50)
    targets = [f"results/tiny/{f}" for f in (
        "P02/M12/strength.json", "tables/longitudinal.csv", "tables/exclusions.csv")]
    lines = _keep_going(tmp_path, cd, targets)
    assert lines[0].startswith("1 failed job(s)"), lines
    assert lines[1].startswith("patient P02, timepoint M12: rule accept_strength: ERROR: "
                               "patient P02, timepoint M12, compression"), lines
    for case in ("compression", "pullout_left", "pullout_right"):
        rec = json.loads((res / "P02" / "M12" / f"{case}.json").read_text())
        assert rec["strength_n"] is None and rec["stop_reason"].startswith(
            "solve stopped with exit code"), rec["stop_reason"]
        # the quoted error is numpy's, from the log of the crashed solve
        assert "the solve stopped with exit code" in rec["refused"], rec["refused"]
        assert ("last error in logs/tiny/P02/M12/solve_" f"{case}.log: 'ValueError"
                in rec["refused"]), rec["refused"]
        pixels.assert_curve_without_result(res / "P02" / "M12" / f"{case}_curve.png",
                                           rec["stop_reason"])
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    kept = ~((before["patient"] == "P02") & (before["timepoint"] == "M12"))
    pd.testing.assert_frame_equal(long, before.loc[kept, long.columns].reset_index(drop=True))
    excl = pd.read_csv(res / "tables" / "exclusions.csv", dtype=str)
    assert excl[["patient", "timepoint"]].values.tolist() == [["P02", "M12"]]
    assert "the solve stopped with exit code" in excl["reason"][0]


def test_a_new_demo_generator_regenerates_the_demo_scans(tiny_run, monkeypatch, tmp_path):
    """Rule generate_demo_scan takes the generator's code digest as a parameter: the tiny
    run recorded the current one, a dry-run finds nothing to do, and a scan whose record
    holds another digest (made by an older generator) is regenerated, with the rest of
    the pipeline after it. The digest itself changes with the generator's source."""
    import base64

    from qctfea.demo import synth

    digest = synth.generator_digest()
    meta = tiny_run / ".snakemake" / "metadata" / base64.urlsafe_b64encode(
        b"resources/tiny/P01/M00/truth.json").decode()
    record = json.loads(meta.read_text())
    assert record["rule"] == "generate_demo_scan" and repr(digest) in record["params"]
    cd = tiny_run / "cohorts"

    def dry_run():
        p = run([venv_bin("snakemake"), "-n", "--nolock", *_tiny_args(tiny_run, cd)],
                cwd=REPO, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout + p.stderr

    assert "Nothing to be done" in dry_run()
    original = meta.read_text()
    try:
        older = [repr("0" * 16) if v == repr(digest) else v for v in record["params"]]
        meta.write_text(json.dumps({**record, "params": older}))
        text = dry_run()
    finally:
        meta.write_text(original)
    assert re.search(r"params have changed since last execution:\s+generate_demo_scan", text)
    assert "resources/tiny/P01/M00/truth.json" in text
    assert "resources/tiny/P02/M00/truth.json" not in text
    # a changed generator module changes the digest
    mod = tmp_path / "fake_generator_part.py"
    mod.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(synth, "GENERATOR_MODULES", (*synth.GENERATOR_MODULES,
                                                     "fake_generator_part"))
    before = synth.generator_digest()
    mod.write_text("X = 2\n")
    assert synth.generator_digest() != before != digest
