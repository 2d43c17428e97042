# FE model: conforming tetrahedral mesh of bone + screws, element materials.


# A checkpoint: a vertebra that cannot be meshed (CGAL gives no tetrahedra, a screw without
# cells) still gets its mesh.json (with the refusal), a placeholder mesh and a picture with the
# message, so that the cohort tables can be built without the scan (--keep-going); rule
# accept_mesh then fails the scan with the message.
checkpoint mesh_vertebra:
    input:
        parts=rules.extract_vertebra.output.parts,
        vertebra=vertebra_accepted,  # the label map's gate
        screws=rules.plan_screws.output[0] if PULLOUT else [],  # none: no screws meshed
        accepted=rules.accept_screws.output[0] if PULLOUT else [],  # the planning gate
    output:
        mesh=f"{RES}/{{patient}}/{{timepoint}}/mesh.xdmf",
        h5=f"{RES}/{{patient}}/{{timepoint}}/mesh.h5",
        json=f"{RES}/{{patient}}/{{timepoint}}/mesh.json",
        png=report(
            f"{RES}/{{patient}}/{{timepoint}}/mesh.png",
            caption="../report/mesh.rst",
            category="QC",
            subcategory="Mesh",
            labels={"patient": "{patient}", "timepoint": "{timepoint}"},
        ),
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/mesh_vertebra.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/mesh_vertebra.tsv"
    conda:
        "../../envs/model.yaml"
    resources:
        mem_mb=4000,
    params:
        cfg=CCFG.get("mesh", {}),
    script:
        "../scripts/mesh_vertebra.py"


rule accept_mesh:
    input:
        rules.mesh_vertebra.output.json,
    output:
        f"{RES}/{{patient}}/{{timepoint}}/mesh_accepted.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/accept_mesh.log",
    # a gate reads one JSON record: run by Snakemake itself, also on a cluster
    localrule: True
    conda:
        "../../envs/model.yaml"
    script:
        "../scripts/accept_mesh.py"


rule assign_materials:
    input:
        # Follow-ups: the baseline model with this visit's density (see model_timepoint).
        mesh=model_file("mesh.xdmf"),
        h5=model_file("mesh.h5"),
        meshed=model_file("mesh_accepted.json"),  # the mesh's gate
        density=model_density,
        screws=model_screws,
        registered=registration_accepted,  # the registration gate (follow-ups)
        calibrated=calibration_accepted,  # the calibration gates (this scan, its baseline)
    output:
        npz=f"{RES}/{{patient}}/{{timepoint}}/materials.npz",
        json=f"{RES}/{{patient}}/{{timepoint}}/materials.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/assign_materials.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/assign_materials.tsv"
    conda:
        "../../envs/model.yaml"
    resources:
        mem_mb=scan_mem("materials"),
    params:
        cfg=CCFG.get("materials", {}),
    script:
        "../scripts/assign_materials.py"


# 3D Slicer round trip (docs/slicer.md): every scan's screws as markups and STL and its
# vertebra surface as STL, in that scan's LPS coordinates, to load beside its CT: a model's
# own, or for a registered follow-up its baseline model's carried by registration.tfm.
# Refused screws are exported too, for review.
rule export_slicer:
    input:
        screws=model_file("screws.json"),
        parts=model_file("vertebra.nii.gz"),
        transform=registration_transform,
        registered=registration_accepted,  # the registration gate (follow-ups)
        vertebra=vertebra_accepted,  # the label map's gate
    output:
        markups=f"{RES}/{{patient}}/{{timepoint}}/slicer/screws.mrk.json",
        vertebra=f"{RES}/{{patient}}/{{timepoint}}/slicer/vertebra.stl",
        screws=expand(
            f"{RES}/{{{{patient}}}}/{{{{timepoint}}}}/slicer/screw_{{side}}.stl", side=SIDES
        ),
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/export_slicer.log",
    conda:
        "../../envs/model.yaml"
    script:
        "../scripts/export_slicer.py"
