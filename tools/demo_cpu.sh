#!/usr/bin/env bash
# The demo workflow, forced (`--forceall`), with the CPU time of Snakemake's own process
# (utime + stime from /proc/<pid>/stat, its jobs not included) sampled every 0.5 s.
# Usage, from a checkout whose .venv is built (`make env`):
#   bash tools/demo_cpu.sh [extra snakemake options, e.g. --scheduler greedy]
# Prints: workflow seconds, exit code, and the last sample in clock ticks (getconf CLK_TCK).
set -u
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0
fi
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 MPLBACKEND=Agg
mkdir -p logs/demo
start=$(date +%s.%N)
snakemake --cores 2 --config cohort=demo --forceall "$@" > logs/demo/demo_cpu.log 2>&1 &
job=$!
pid=$job  # the snakemake script itself (its shebang execs the interpreter)
last=""
while kill -0 "$job" 2>/dev/null; do
  l=$(awk '{print $14, $15}' "/proc/$pid/stat" 2>/dev/null) && [ -n "$l" ] && last=$l
  sleep 0.5
done
wait "$job"; rc=$?
end=$(date +%s.%N)
echo "workflow $(python3 -c "print(round($end - $start, 1))") s, exit $rc; Snakemake's own" \
     "process: utime stime $last clock ticks of 1/$(getconf CLK_TCK) s (log: logs/demo/demo_cpu.log)"
