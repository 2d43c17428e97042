"""A specimen through the workflow (docs/specimens.md): a density-calibrated NIfTI with label ids
(trabecular 1, cortical 2, PMMA end caps 3), compression only (no screws), free platens,
linear analysis, run by `snakemake` like any cohort. Its compression stiffness is checked
against the closed form of a prism of layers in series under uniaxial stress.

Closed form: bone (modulus E_b, height H) between two caps (E_c, thickness T), same
cross-section A, free lateral platens: k = 1 / (H / (E_b A) + 2 T / (E_c A)). It is the
exact solution when the lateral strains of the layers agree, nu_b / E_b = nu_c / E_c (then
every layer is in uniaxial stress), and a P1 mesh represents that linear field exactly.
E_b is computed here from Kopperdahl et al. 2002's published law, E = 2980 rho^1.05 (MPa,
rho the QCT density in g/cm³), not by the library."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import svgdata
from conftest import REPO, run, venv_bin

H_VOX = 0.5  # voxel size (mm)
SIDE, H, T = 20.0, 14.0, 3.0  # square cross-section side, bone height, cap thickness (mm)
RHO = 300.0  # mg/cm³, uniform
E_CAP, NU_CAP = 2500.0, 0.3  # PMMA
E_BONE = 2980.0 * (RHO / 1000.0) ** 1.05  # Kopperdahl 2002, written out here
NU_BONE = NU_CAP * E_BONE / E_CAP  # equal nu / E: uniaxial stress in every layer
AREA = SIDE * SIDE
K_CLOSED = 1.0 / (H / (E_BONE * AREA) + 2 * T / (E_CAP * AREA))

CONFIG = f"""\
# A voxel-FE-benchmark style specimen: density in mg/cm³, label ids, PMMA caps.
samples: samples.tsv
calibration: {{method: fixed, slope: 1, intercept: 0}}
mask:
  bone_labels: [1, 2]       # trabecular, cortical
  cap_labels: [3]           # PMMA end caps
  body_opening_mm: 3
mesh:
  voxel_mm: 0.5
  bone_cell_size_mm: 2.5
  facet_distance_mm: 0.2
materials:
  law: kopperdahl2002
  poisson_bone: {NU_BONE:.6f}
  cap_modulus_mpa: {E_CAP}
  cap_poisson: {NU_CAP}
loads:
  cases: [compression]      # no screws, no pullout
  platens: free
  analysis: linear
mpi:
  tasks: 2
"""


def write_specimen(folder):
    """Box specimen on a 0.5 mm grid: trabecular core (1), 1 mm cortical rim (2) and caps (3);
    density RHO in the specimen and 2 voxels around it (so that interpolation at its surface
    sees RHO), 0 beyond."""
    m = 6  # voxels of margin
    ns, nb, nc = int(SIDE / H_VOX), int(H / H_VOX), int(T / H_VOX)
    nz, nxy = nb + 2 * nc + 2 * m, ns + 2 * m
    lab = np.zeros((nz, nxy, nxy), np.uint8)
    lab[m + nc:m + nc + nb, m:m + ns, m:m + ns] = 2
    r = int(1.0 / H_VOX)
    lab[m + nc:m + nc + nb, m + r:m + ns - r, m + r:m + ns - r] = 1
    lab[m:m + nc, m:m + ns, m:m + ns] = 3
    lab[m + nc + nb:m + 2 * nc + nb, m:m + ns, m:m + ns] = 3
    dens = np.zeros(lab.shape, np.float32)
    dens[m - 2:nz - m + 2, m - 2:nxy - m + 2, m - 2:nxy - m + 2] = RHO
    for arr, name in ((dens, "density.nii.gz"), (lab, "labels.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((H_VOX,) * 3)
        img.SetOrigin((-SIDE / 2 - m * H_VOX, -SIDE / 2 - m * H_VOX, -m * H_VOX))
        sitk.WriteImage(img, str(folder / name))


@pytest.fixture(scope="module")
def specimen_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("specimen")
    data = work / "data"
    data.mkdir()
    write_specimen(data)
    cohort = work / "cohorts" / "specimen"
    cohort.mkdir(parents=True)
    (cohort / "config.yaml").write_text(CONFIG)
    (cohort / "samples.tsv").write_text(
        "patient\ttimepoint\tmonths\timage\tlabels\n"
        f"B01\tT0\t0\t{data / 'density.nii.gz'}\t{data / 'labels.nii.gz'}\n")
    t0 = time.perf_counter()
    p = run([venv_bin("snakemake"), "--cores", "2", "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(work), "--configfile", str(REPO / "config" / "config.yaml"),
             "--config", "cohort=specimen", f"cohorts_dir={work / 'cohorts'}",
             "--show-failed-logs"], cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    print(f"workflow: {time.perf_counter() - t0:.1f} s")
    return work / "results" / "specimen"


def test_specimen_stiffness_matches_layers_in_series(specimen_run):
    res = json.loads((specimen_run / "B01" / "T0" / "compression.json").read_text())
    assert res["platens"] == "free" and res["load_axis"] == "z"
    assert res["load_axis_tilt_deg"] < 0.5
    k = res["stiffness_n_per_mm"]
    print(f"compression stiffness {k:.1f} N/mm, closed form {K_CLOSED:.1f} N/mm "
          f"({100 * (k / K_CLOSED - 1):+.2f} %); E_bone {E_BONE:.1f} MPa, nu_bone {NU_BONE:.4f}")
    assert k == pytest.approx(K_CLOSED, rel=0.03)


def test_compression_only_cohort_has_no_screws_and_no_pullout(specimen_run):
    scan = specimen_run / "B01" / "T0"
    assert not list(scan.glob("screws.json")) and not list(scan.glob("pullout_*"))
    mesh = json.loads((scan / "mesh.json").read_text())
    assert set(mesh["cells_per_tag"]) <= {"1", "2", "5"}, mesh["cells_per_tag"]  # no screws
    assert mesh["screw_volume"] == {}
    bmd = json.loads((scan / "bmd.json").read_text())
    assert bmd["around_screw_vbmd_mg_cm3"] == {}
    assert bmd["trabecular_vbmd_mg_cm3"] == pytest.approx(RHO, rel=1e-4)
    long = pd.read_csv(specimen_run / "tables" / "longitudinal.csv")
    assert len(long) == 1 and long["compression_stiffness_n_per_mm"].notna().all()
    assert not [c for c in long.columns if "pullout" in c or "around_screw" in c]
    for f in ("tables/wide.csv", "tables/summary_by_timepoint.csv", "stats/correlations.csv",
              "stats/summary.json", "report/summary.html"):
        assert "pullout" not in (specimen_run / f).read_text(), f
    assert not list((specimen_run / "figures").glob("*pullout*"))
    # the stiffness plot: the one scan's marker (grey) and the cohort mean's (red) coincide
    svg = specimen_run / "figures" / "spaghetti_compression_stiffness_n_per_mm.svg"
    (scan_point,) = svgdata.line_markers(svg, "#999999")
    mean_points = np.concatenate(svgdata.line_markers(svg, "#d62728"))  # mean, its caps
    assert scan_point.shape == (1, 2) and len(mean_points) >= 1
    np.testing.assert_allclose(mean_points, np.repeat(scan_point, len(mean_points), 0),
                               atol=1e-6)


def test_platens_and_poisson_ratios(tmp_path):
    """The same specimen through the steps (1 rank): free platens reproduce the closed form
    whenever the layers' nu / E agree (nu = 0 included); fixed platens hold the lateral
    expansion and come out stiffer, as do free platens with mismatched nu / E (the stiff caps
    restrain the bone at the interfaces). The table of docs/specimens.md."""
    from qctfea.steps import fea as steps_fea
    from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
    from qctfea.steps import model as steps_model

    write_specimen(tmp_path)
    t, ctx = tmp_path, "patient B01, timepoint T0"
    steps_imaging.calibrate(ct_path=t / "density.nii.gz", labels_path=None,
                            out_density=t / "dens.nii.gz", out_json=t / "cal.json",
                            out_png=t / "cal.png",
                            cfg={"method": "fixed", "slope": 1, "intercept": 0}, context=ctx,
                            label=23)
    steps_vertebra.mask(ct_path=t / "density.nii.gz", labels_path=t / "labels.nii.gz",
                        out_parts=t / "vertebra.nii.gz", out_json=t / "vertebra.json",
                        cfg={"bone_labels": [1, 2], "cap_labels": [3], "body_opening_mm": 3},
                        context=ctx)
    steps_model.mesh(parts_path=t / "vertebra.nii.gz", screws_path=None, out_mesh=t / "mesh.xdmf",
                     out_json=t / "mesh.json",
                     cfg={"voxel_mm": 0.5, "bone_cell_size_mm": 2.5, "facet_distance_mm": 0.2},
                     context=ctx)
    k = {}
    for nu_b, nu_c in ((NU_BONE, NU_CAP), (0.3, 0.3), (0.0, 0.0)):
        steps_model.materials(mesh_path=t / "mesh.xdmf", density_path=t / "dens.nii.gz",
                              screws_path=None, out_npz=t / "mat.npz", out_json=t / "mat.json",
                              cfg={"law": "kopperdahl2002", "poisson_bone": nu_b,
                                   "cap_modulus_mpa": E_CAP, "cap_poisson": nu_c}, context=ctx)
        for platens in ("free", "fixed"):
            steps_fea.solve(case="compression", mesh_path=t / "mesh.xdmf",
                            materials_path=t / "mat.npz", mask_json=t / "vertebra.json",
                            screws_path=None, out_json=t / "c.json",
                            loads_cfg={"analysis": "linear", "platens": platens}, solver_cfg={},
                            context=ctx)
            k[nu_b, platens] = json.loads((t / "c.json").read_text())["stiffness_n_per_mm"]
            print(f"nu bone {nu_b:.4f}, caps {nu_c:.2f}, {platens} platens: {k[nu_b, platens]:.0f}"
                  f" N/mm ({100 * (k[nu_b, platens] / K_CLOSED - 1):+.2f} % vs closed form)")
    assert k[NU_BONE, "free"] == pytest.approx(K_CLOSED, rel=0.01)
    assert k[0.0, "free"] == pytest.approx(k[NU_BONE, "free"], rel=1e-3)  # uniaxial: nu-free
    assert k[0.0, "fixed"] == pytest.approx(k[0.0, "free"], rel=1e-3)  # nothing to restrain
    assert k[NU_BONE, "fixed"] > 1.01 * k[NU_BONE, "free"]
    assert k[0.3, "fixed"] > k[0.3, "free"] > 1.01 * k[NU_BONE, "free"]
