# MPI-parallel linear FE solves (DOLFINx/PETSc). `resources.mpi` is the launcher:
# "mpiexec" locally (the environment's MPICH), "srun --mpi=pmi2" on SLURM.
# `tasks` MPI ranks per solve come from the cohort config (mpi.tasks).


rule solve_compression:
    input:
        mesh=rules.mesh_vertebra.output.mesh,
        h5=rules.mesh_vertebra.output.h5,
        materials=rules.assign_materials.output.npz,
        vertebra=rules.extract_vertebra.output.json,
        screws=rules.plan_screws.output[0],
    output:
        f"{RES}/{{patient}}/{{timepoint}}/compression.json",
    params:
        loads=section("loads"),
        solver=section("solver"),
    threads: TASKS
    resources:
        mpi="mpiexec",
        tasks=TASKS,
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/solve_compression.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/solve_compression.tsv"
    conda:
        "../../envs/qctfea.yaml"
    shell:
        "{resources.mpi} -n {resources.tasks} qctfea solve compression"
        " --patient {wildcards.patient} --timepoint {wildcards.timepoint}"
        " --mesh {input.mesh} --materials {input.materials} --vertebra {input.vertebra}"
        " --screws {input.screws} --out-json {output}"
        " --params '{params.loads}' --solver-params '{params.solver}' > {log} 2>&1"


rule solve_pullout:
    input:
        mesh=rules.mesh_vertebra.output.mesh,
        h5=rules.mesh_vertebra.output.h5,
        materials=rules.assign_materials.output.npz,
        vertebra=rules.extract_vertebra.output.json,
        screws=rules.plan_screws.output[0],
    output:
        f"{RES}/{{patient}}/{{timepoint}}/pullout_{{side}}.json",
    params:
        loads=section("loads"),
        solver=section("solver"),
    threads: TASKS
    resources:
        mpi="mpiexec",
        tasks=TASKS,
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/solve_pullout_{{side}}.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/solve_pullout_{{side}}.tsv"
    conda:
        "../../envs/qctfea.yaml"
    shell:
        "{resources.mpi} -n {resources.tasks} qctfea solve pullout --side {wildcards.side}"
        " --patient {wildcards.patient} --timepoint {wildcards.timepoint}"
        " --mesh {input.mesh} --materials {input.materials} --vertebra {input.vertebra}"
        " --screws {input.screws} --out-json {output}"
        " --params '{params.loads}' --solver-params '{params.solver}' > {log} 2>&1"
