#!/usr/bin/env bash
# The cross-entropy levers of issue 9, each one `captioner train --set ...` away from the baseline recipe,
# then every run's best checkpoint decoded on dev (greedy, beam 3) by benchmarks/levers.py.
#
#   bash benchmarks/lever_runs.sh [WORKDIR] [RUNS]
#
# Environment: EPOCHS (10), CONFIG (configs/flickr8k-gpu.toml), LEVERS (names below, default all),
# PARALLEL=1 to train them all at once (a GPU has room), FEATURE_ARGS for `captioner features`
# (e.g. "--backend torch --device cuda --images DIR"), DEADLINE (seconds after which training stops, default none).
# On 2 CPU cores each run takes ~35 min; on an H200 all of them together take minutes.
set -u
WORK=${1:-work/flickr8k}
RUNS=${2:-runs/levers}
EPOCHS=${EPOCHS:-10}
CONFIG=${CONFIG:-configs/flickr8k-gpu.toml}
PY=${PY:-python3}
CLI="$PY -m captioner.apps.cli"
T0=$(date +%s)

declare -A SETS=(
  [base]=""
  [dec256]="--set decoder_dim=256"
  [dec1024]="--set decoder_dim=1024"
  [flip]="--set flip_prob=0.5"
  [lite0]="--set encoder=lite0"
  [lite1]="--set encoder=lite1"
  [lite0+lite2]="--set encoder=lite0+lite2"
  [lite2-cut2]="--set encoder=lite2-cut2"
)
declare -A STORES=(  # what each lever needs beyond the lite2 store
  [flip]="--encoder lite2 --flip" [lite0]="--encoder lite0" [lite1]="--encoder lite1"
  [lite0+lite2]="--encoder lite0+lite2" [lite2-cut2]="--encoder lite2-cut2"
)
LEVERS=${LEVERS:-base dec256 dec1024 flip lite0 lite1 lite0+lite2 lite2-cut2}
mkdir -p "$RUNS"

# 1. feature stores (resumable; a finished one is skipped in a second)
$CLI features "$WORK" ${FEATURE_ARGS:-} > "$RUNS/features-lite2.out" 2>&1 || { cat "$RUNS/features-lite2.out"; exit 1; }
for lever in $LEVERS; do
  [ -n "${STORES[$lever]:-}" ] || continue
  if [ "${PARALLEL:-0}" = 1 ]; then
    $CLI features "$WORK" ${STORES[$lever]} ${FEATURE_ARGS:-} > "$RUNS/features-$lever.out" 2>&1 &
  else
    $CLI features "$WORK" ${STORES[$lever]} ${FEATURE_ARGS:-} > "$RUNS/features-$lever.out" 2>&1
  fi
done
wait
grep -h "images stored" "$RUNS"/features-*.out
echo "features done at $(( $(date +%s) - T0 )) s"

# 2. training, one run folder per lever
train() {
  local left=""
  [ -n "${DEADLINE:-}" ] && left="timeout $(( DEADLINE - ($(date +%s) - T0) ))"
  $left $CLI train "$WORK" --out "$RUNS/$1" --config "$CONFIG" --epochs "$EPOCHS" ${SETS[$1]} \
    > "$RUNS/$1.out" 2> "$RUNS/$1.err"
  local rc=$?
  echo "$1: exit $rc, $(grep -c '^epoch' "$RUNS/$1.out") epochs; $(grep '(best)' "$RUNS/$1.out" | tail -1)"
  [ $rc = 0 ] || tail -n 3 "$RUNS/$1.err"
}
for lever in $LEVERS; do
  if [ "${PARALLEL:-0}" = 1 ]; then train "$lever" & else train "$lever"; fi
done
wait
echo "training done at $(( $(date +%s) - T0 )) s"

# 3. beam search on dev for every best checkpoint
for lever in $LEVERS; do
  [ -f "$RUNS/$lever/best.safetensors" ] || continue
  cmd="$PY benchmarks/levers.py --work $WORK --models $RUNS/$lever/best.safetensors --beams 1 3 --out $RUNS/$lever/levers.json"
  if [ "${PARALLEL:-0}" = 1 ]; then OMP_NUM_THREADS=2 $cmd > "$RUNS/$lever.eval" 2>&1 & else $cmd > "$RUNS/$lever.eval" 2>&1; fi
done
wait
cat "$RUNS"/*.eval
echo "all done at $(( $(date +%s) - T0 )) s"
$PY benchmarks/lever_table.py "$RUNS" --out "$RUNS/lever_runs.json"
