"""The demo generator's renderer (qctfea.demo.synth.render_scan)."""
import numpy as np

from qctfea.demo import synth


def test_render_does_not_depend_on_the_slab_size(monkeypatch):
    """The scan is rendered a few fine slices at a time: the image and labels are bitwise
    those of one slab holding the whole grid (the renderer before slabs), for a slab size
    that does not divide the grid, and the vertebra's deep trabecular voxels hold the true
    density times the scan's HU per mg/cm³ (blur and noise off)."""
    p = synth.SynthParams(fov_z_mm=6.0, noise_hu=0.0, blur_sigma_xy_mm=0.0, blur_sigma_z_mm=0.0,
                          supersample=1)
    anat = synth.patient_anatomy(2021, "P02", p)
    pose = synth.scan_pose(2021, "P02", 12.0, p)
    monkeypatch.setattr(synth, "RENDER_SLAB", 10_000)
    whole = synth.render_scan(anat, pose, 12.0, p)
    monkeypatch.setattr(synth, "RENDER_SLAB", 5)
    slabs = synth.render_scan(anat, pose, 12.0, p)
    assert whole["hu"].shape[0] % 5 != 0
    np.testing.assert_array_equal(slabs["hu"], whole["hu"])
    np.testing.assert_array_equal(slabs["labels"], whole["labels"])
    # independent of the renderer's loops: the true density at the voxel centres
    nz, ny, nx = whole["hu"].shape
    o, sp = whole["origin"], whole["spacing"]
    z, y, x = np.meshgrid(*(o[i] + sp[i] * np.arange(n) for i, n in ((2, nz), (1, ny), (0, nx))),
                          indexing="ij")
    d = np.stack([x, y, z]) - (synth.CENTRE + pose.translation_mm)[:, None, None, None]
    a = np.einsum("ji,j...->i...", pose.matrix, d)
    rho, sd = synth.true_density(anat, 12.0, *a)
    deep = sd["body"] < -2 * anat.cortex_mm
    assert deep.sum() > 1000
    np.testing.assert_allclose(whole["hu"][deep], pose.hu_per_mg * rho[deep], rtol=1e-5)
