#!/usr/bin/env bash
# Two codes on one machine, request by request: the trace at one N replayed by this tree's code and by BASE's
# (a directory holding another revision's swapserve/ and bench/, e.g. `git archive REV swapserve bench | tar -x
# -C BASE`), PAIRS times each, every replay on a node of its own, the order alternating from pair to pair; then
# bench/paired.py on each pair, into OUT/paired.md. Attainment at N=400 moves by 0.1-0.2 between replays; the
# paired differences resolve a few hundred µs per request, and whether the pairs agree says how sure that is.
#
#   bench/code_ab.sh BASE OUT [N] [PAIRS]      (DURATION, WARMUP, MAX_BATCH as for bench/trace.py; defaults 20, 5, 1;
#                                               TRACE_ARGS: more of trace.py's flags, e.g. "--peer-copies";
#                                               NEW_ARGS, BASE_ARGS: flags for one side's replays only)
#
# A setting the node cannot change while it runs (``serve --fronts``) is paired the same way: BASE a copy of this
# tree, NEW_ARGS="--fronts 2".
#
# Each run writes OUT/{new,base}_<pair>/ (trace.json, trace.md, trace_raw/, the node's log). The device tool
# returns a limited number of files: tar OUT before it comes back.
set -euo pipefail
BASE=$(cd "${1:?base tree (swapserve/ and bench/ of the other revision)}" && pwd)
OUT=$(mkdir -p "${2:?results dir}" && cd "$2" && pwd)
N=${3:-400}
PAIRS=${4:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARGS=(--policies swapserve --sweep "$N" --duration "${DURATION:-20}" --warmup "${WARMUP:-5}"
      --max-batch "${MAX_BATCH:-1}" --raw ${TRACE_ARGS:-})
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
  *H200*) SLO_FROM=$(ls "$ROOT"/bench/results/h200_*/swap_latency.json | tail -1) ;;
esac
WORK=$(mktemp -d /tmp/code-ab-XXXX)  # each code's artifacts exported once, reused by its later replays
if [ -n "${SLO_FROM:-}" ]; then cp "$SLO_FROM" "$WORK/slo.json"; ARGS+=(--slo-from "$WORK/slo.json"); fi
# Both trees are copied first: on a lent machine a later call replaces the copy of the working tree (and what
# it carries) while the pairs run (session 22 lost a replay so: its working directory went away under it).
for t in new base; do
  src=$ROOT; [ $t = base ] && src=$BASE
  mkdir -p "$WORK/${t}_tree/bench"
  cp -r "$src/swapserve" "$WORK/${t}_tree/"
  find "$src/bench" -maxdepth 1 -type f -exec cp {} "$WORK/${t}_tree/bench/" \;
done
run() {  # run VERSION PAIR
  local tree=$WORK/$1_tree
  mkdir -p "$WORK/$1"
  echo "=== $(date -u +%T) $1, pair $2 of $PAIRS"
  local side=NEW_ARGS; [ "$1" = base ] && side=BASE_ARGS
  # shellcheck disable=SC2086  # the side's flags split into words, as TRACE_ARGS do
  (cd "$tree" && PYTHONPATH="$tree" python3 bench/trace.py --out "$OUT/$1_$2" --work "$WORK/$1" "${ARGS[@]}" ${!side:-})
}
for i in $(seq 1 "$PAIRS"); do
  if [ $((i % 2)) = 1 ]; then run new "$i"; run base "$i"; else run base "$i"; run new "$i"; fi
done
for i in $(seq 1 "$PAIRS"); do
  echo "## Pair $i"
  echo
  python3 "$ROOT/bench/paired.py" "$OUT/base_$i" "$OUT/new_$i" --exclude gpt2-medium
  echo
done > "$OUT/paired.md"
cat "$OUT/paired.md"
rm -rf "$WORK"
