#!/usr/bin/env bash
# `make test`: the test suite as two pytest processes at once. Most tests keep one core
# busy (Python, SimpleITK, meshing); on a 2-core machine one process left the other core
# idle or to the SLURM test's background runs, and the suite took 16 minutes. The tests
# that run whole workflows (and share the tiny cohort's run and the SLURM cluster's session
# fixtures: tests/conftest.py, tests/slurm_cluster.py) form one process, every other test
# file the other; a new test file goes to the second unless listed here. Both print to
# their own log; the second's is printed live, the first's when both have finished.
# test_label_folder.py and test_ingest_rules.py run with the first to even the two out (in
# a clone of 0407f15 on 2026-12-07, with test_ingest_rules.py in the second, the second
# took 946 s and the first 843 s; the file took 46 s there).
# Exit status: non-zero when either process failed.
set -uo pipefail
cd "$(dirname "$0")/.."
WORKFLOW_TESTS=(
  tests/test_workflow.py
  tests/test_report.py
  tests/test_real_workflow.py
  tests/test_specimen.py
  tests/test_slurm.py
  tests/test_label_folder.py
  tests/test_ingest_rules.py
)
ignore=()
for f in "${WORKFLOW_TESTS[@]}"; do ignore+=("--ignore=$f"); done
mkdir -p logs
log_a=logs/test-workflow.log
start=$(date +%s)
echo "[test] workflow tests (${WORKFLOW_TESTS[*]}) in the background, log $log_a"
python -m pytest -ra --durations=10 -p no:cacheprovider "${WORKFLOW_TESTS[@]}" \
  > "$log_a" 2>&1 &
pid_a=$!
echo "[test] every other test file here:"
python -m pytest -ra --durations=10 "${ignore[@]}" tests
rc_b=$?
echo "[test] waiting for the workflow tests ($log_a) ..."
wait "$pid_a"
rc_a=$?
echo "[test] ---- workflow tests ($log_a) ----"
cat "$log_a"
echo "[test] suite finished in $(( $(date +%s) - start )) s: workflow tests exit $rc_a," \
  "other tests exit $rc_b"
[ "$rc_a" = 0 ] && [ "$rc_b" = 0 ]
