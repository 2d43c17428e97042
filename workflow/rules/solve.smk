# MPI-parallel FE solves (DOLFINx/PETSc), linear or elasto-plastic (loads.analysis), of the
# load cases in loads.cases. `resources.mpi` is the launcher:
# "mpiexec" locally (the environment's MPICH), "srun --mpi=pmi2" on SLURM.
# `tasks` MPI ranks per solve come from the cohort config (mpi.tasks); threads=tasks books
# the cores locally. The SLURM profile sets mpi, cpus_per_task=1 and runtime (profiles/slurm).


rule solve_compression:
    input:
        mesh=model_file("mesh.xdmf"),
        h5=model_file("mesh.h5"),
        materials=rules.assign_materials.output.npz,
        vertebra=model_file("vertebra.json"),
        screws=model_screws,
    output:
        json=f"{RES}/{{patient}}/{{timepoint}}/compression.json",
        curve=f"{RES}/{{patient}}/{{timepoint}}/compression_curve.csv",
        plot=f"{RES}/{{patient}}/{{timepoint}}/compression_curve.png",
        fields=f"{RES}/{{patient}}/{{timepoint}}/compression_fields.xdmf",
        fields_h5=f"{RES}/{{patient}}/{{timepoint}}/compression_fields.h5",
    params:
        loads=section("loads"),
        solver=section("solver"),
        screws=lambda w: f"--screws {model_screws(w)}" if PULLOUT else "",
    threads: TASKS
    resources:
        mpi="mpiexec",
        tasks=TASKS,
        mem_mb=4000,
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/solve_compression.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/solve_compression.tsv"
    conda:
        "../../envs/fea.yaml"
    shell:
        "{resources.mpi} -n {resources.tasks} qctfea solve compression"
        " --patient {wildcards.patient} --timepoint {wildcards.timepoint}"
        " --mesh {input.mesh} --materials {input.materials} --vertebra {input.vertebra}"
        " {params.screws} --out-json {output.json} --out-curve {output.curve}"
        " --out-plot {output.plot} --out-fields {output.fields}"
        " --params '{params.loads}' --solver-params '{params.solver}' > {log} 2>&1"


# Only with pullout in loads.cases (the aggregation asks for these results).
rule solve_pullout:
    input:
        mesh=model_file("mesh.xdmf"),
        h5=model_file("mesh.h5"),
        materials=rules.assign_materials.output.npz,
        vertebra=model_file("vertebra.json"),
        screws=model_file("screws.json"),
    output:
        json=f"{RES}/{{patient}}/{{timepoint}}/pullout_{{side}}.json",
        curve=f"{RES}/{{patient}}/{{timepoint}}/pullout_{{side}}_curve.csv",
        plot=f"{RES}/{{patient}}/{{timepoint}}/pullout_{{side}}_curve.png",
        fields=f"{RES}/{{patient}}/{{timepoint}}/pullout_{{side}}_fields.xdmf",
        fields_h5=f"{RES}/{{patient}}/{{timepoint}}/pullout_{{side}}_fields.h5",
    params:
        loads=section("loads"),
        solver=section("solver"),
    threads: TASKS
    resources:
        mpi="mpiexec",
        tasks=TASKS,
        mem_mb=4000,
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/solve_pullout_{{side}}.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/solve_pullout_{{side}}.tsv"
    conda:
        "../../envs/fea.yaml"
    shell:
        "{resources.mpi} -n {resources.tasks} qctfea solve pullout --side {wildcards.side}"
        " --patient {wildcards.patient} --timepoint {wildcards.timepoint}"
        " --mesh {input.mesh} --materials {input.materials} --vertebra {input.vertebra}"
        " --screws {input.screws} --out-json {output.json} --out-curve {output.curve}"
        " --out-plot {output.plot} --out-fields {output.fields}"
        " --params '{params.loads}' --solver-params '{params.solver}' > {log} 2>&1"


# The solve stage's gate: a load case whose curve did not peak reports no strength
# (docs/nonlinear.md); this rule then fails the scan with the reason and what to do, and the
# cohort tables leave the scan out (tables/exclusions.csv lists it).
rule accept_strength:
    input:
        compression=rules.solve_compression.output.json,
        pullout=lambda w: [f"{RES}/{w.patient}/{w.timepoint}/pullout_{s}.json" for s in SIDES]
        if PULLOUT else [],
    output:
        f"{RES}/{{patient}}/{{timepoint}}/strength.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/accept_strength.log",
    conda:
        "../../envs/cohort.yaml"
    script:
        "../scripts/accept_strength.py"
