# MPI-parallel FE solves (DOLFINx/PETSc), linear or elasto-plastic (loads.analysis), of the
# load cases in loads.cases. `resources.mpi` is the launcher:
# "mpiexec" locally (the environment's MPICH), "srun --mpi=pmi2" on SLURM.
# `tasks` MPI ranks per solve come from the cohort config (mpi.tasks); threads=tasks books
# the cores locally. The SLURM profile sets mpi, cpus_per_task=1 and runtime (profiles/slurm).


# One rule, one job per load case: `case` is the result files' stem, compression or
# pullout_<side>; the pullout cases run only with pullout in loads.cases (the aggregation and
# accept_strength ask for their results). A checkpoint: a curve without a peak is recorded in
# its result (refused), so that the cohort tables can be built without that scan
# (--keep-going) while accept_strength fails it.
checkpoint solve:
    input:
        mesh=model_file("mesh.xdmf"),
        h5=model_file("mesh.h5"),
        meshed=model_file("mesh_accepted.json"),  # the mesh's gate
        materials=rules.assign_materials.output.npz,
        # the records of the steps the result rests on that no gate checks before the solve:
        # a refused one (materials, BMD) is recorded as the case's refusal, without solving
        upstream=[rules.assign_materials.output.json, rules.measure_bmd.output.json],
        vertebra=model_file("vertebra.json"),
        # pullout: the scan model's screws; compression: them too when they are meshed in
        # (pullout in loads.cases), else none
        screws=lambda w: (
            model_screws(w) if w.case == "compression" else model_file("screws.json")(w)
        ),
    output:
        json=f"{RES}/{{patient}}/{{timepoint}}/{{case}}.json",
        curve=f"{RES}/{{patient}}/{{timepoint}}/{{case}}_curve.csv",
        plot=report(
            f"{RES}/{{patient}}/{{timepoint}}/{{case}}_curve.png",
            caption="../report/curve.rst",
            category="Force-displacement curves",
            subcategory="{case}",
            labels={"patient": "{patient}", "timepoint": "{timepoint}"},
        ),
        fields=f"{RES}/{{patient}}/{{timepoint}}/{{case}}_fields.xdmf",
        fields_h5=f"{RES}/{{patient}}/{{timepoint}}/{{case}}_fields.h5",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/solve_{{case}}.log",
    benchmark:
        f"benchmarks/{COHORT}/{{patient}}/{{timepoint}}/solve_{{case}}.tsv"
    wildcard_constraints:
        case="|".join(["compression"] + [f"pullout_{s}" for s in SIDES]),
    conda:
        "../../envs/fea.yaml"
    threads: TASKS
    resources:
        mpi="mpiexec",
        tasks=TASKS,
        mem_mb=4000,
    params:
        # `qctfea solve` load case: compression, or pullout with its side
        case=lambda w: w.case.replace("pullout_", "pullout --side "),
        loads=section("loads"),
        solver=section("solver"),
        screws=lambda w, input: f"--screws {input.screws}" if input.screws else "",
    # One thread per MPI rank: Snakemake exports OMP/OPENBLAS_NUM_THREADS=threads (= tasks)
    # to every job, and with 2 ranks x 2 BLAS threads on 2 cores the numpy work of the
    # ranks oversubscribes the cores (demo P01 M00 compression 22.3 s instead of 16.8 s).
    # A solve that ends with an error before writing its result (an unforeseen error, a
    # crash, a process killed for memory) is recorded as the case's refusal by
    # `qctfea solve-failed` (exit code and the log's last error), so the gate fails the scan
    # and the tables go on without it; an interrupted one (SIGINT, SIGTERM) fails the job.
    shell:
        "(OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1"
        " {resources.mpi} -n {resources.tasks} qctfea solve {params.case}"
        " --patient {wildcards.patient} --timepoint {wildcards.timepoint}"
        " --mesh {input.mesh} --materials {input.materials} --vertebra {input.vertebra}"
        " {params.screws} --out-json {output.json} --out-curve {output.curve}"
        " --out-plot {output.plot} --out-fields {output.fields}"
        " --upstream {input.upstream}"
        " --params '{params.loads}' --solver-params '{params.solver}' > {log} 2>&1)"
        " || qctfea solve-failed {params.case} --exit-code $?"
        " --patient {wildcards.patient} --timepoint {wildcards.timepoint} --log {log}"
        " --out-json {output.json} --out-curve {output.curve} --out-plot {output.plot}"
        " --out-fields {output.fields} --params '{params.loads}' >> {log} 2>&1"


# The solve stage's gate: a load case whose curve did not peak reports no strength
# (docs/nonlinear.md); this rule then fails the scan with the reason and what to do, and the
# cohort tables leave the scan out (tables/exclusions.csv lists it).
rule accept_strength:
    input:
        compression=f"{RES}/{{patient}}/{{timepoint}}/compression.json",
        pullout=lambda w: (
            [f"{RES}/{w.patient}/{w.timepoint}/pullout_{s}.json" for s in SIDES] if PULLOUT else []
        ),
    output:
        f"{RES}/{{patient}}/{{timepoint}}/strength.json",
    log:
        f"logs/{COHORT}/{{patient}}/{{timepoint}}/accept_strength.log",
    # a gate reads one JSON record: run by Snakemake itself, also on a cluster
    localrule: True
    conda:
        "../../envs/cohort.yaml"
    script:
        "../scripts/accept_strength.py"
