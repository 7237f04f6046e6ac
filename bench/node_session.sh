#!/usr/bin/env bash
# The node benchmarks for one lent GPU machine, in order, each result written as soon as it exists, so that
# a session can start this in the background and collect what is done (progress in RESULTS/session.log).
#
#   bench/node_session.sh RESULTS_DIR [SWAPSERVE_SWEEP] [ONDEMAND_SWEEP]
#
# BASELINE_SWEEP (default: SWAPSERVE_SWEEP) for fifo_lru and dedicated; DURATION, WARMUP in seconds per point;
# OVERHEAD=0 skips bench/overhead.py; LANES=1 runs every trace with one lane per GPU (serve --lanes 1);
# PIECE_MS sets serve --swap-piece-ms (0: swaps in one go); MAX_BATCH=1 (development runs) captures a third
# of the graphs at start; REPEATS=3 replays each point three times (the point: the median run);
# QUEUE_AHEAD_AB=1 also runs the swapserve sweep with serve --no-queue-ahead (into RESULTS_DIR/no_queue_ahead);
# PROFILE=1 samples the controller and fronts with py-spy through every swapserve point (trace.py --profile);
# FRONTS=K runs every node with K HTTP front processes (serve --fronts K); FRONTS_AB=K also runs the swapserve
# sweep with K fronts after the one without (into RESULTS_DIR/fronts_K; overhead.py with K fronts likewise);
# SIDE_FETCH_AB=1 also runs an interleaved A/B of side fetches on one node (trace.py --alternate; each point
# replayed 2 x REPEATS times, into RESULTS_DIR/side_fetch_ab/side_fetch_true and .../side_fetch_false).
# WITHIN_AB=MS likewise alternates queue-ahead with no limit and only within MS of the run ahead's end
# (queue_ahead_within_ms; into RESULTS_DIR/within_ab/queue_ahead_within_ms_none and ..._MS).
# PEER_COPIES=1 runs every swapserve node with serve --peer-copies (several GPUs); PEER_AB=1 also runs an
# interleaved A/B of peer copies on one node (into RESULTS_DIR/peer_ab/peer_copies_false and ..._true).
# SLOs come from the card's committed swap_latency.json when there is one (bench/results/<gpu>_*/), else
# trace.py measures them first. Sweeps default to one GPU's (100..400 swapserve-style; 25..200 on-demand).
set -u
R=${1:?results dir}
SWEEP=${2:-100,200,300,400}
ONDEMAND_SWEEP=${3:-25,50,100,200}
DURATION=${DURATION:-40}
WARMUP=${WARMUP:-10}
mkdir -p "$R"
exec > >(tee -a "$R/session.log") 2>&1
cd "$(dirname "$0")/.."
step() { echo "=== $(date -u +%T) $*"; }

step machine
# The host store lives in /dev/shm: let it take nearly all memory where we may (tmpfs defaults to half).
[ "$(id -u)" = 0 ] && mount -o remount,size=95% /dev/shm
{ nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; df -h /dev/shm; } > "$R/machine.txt" 2>&1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in
  *H200*) SLO=(--slo-from "$(ls bench/results/h200_*/swap_latency.json | tail -1)") ;;
  *) SLO=() ;;
esac

if [ "${OVERHEAD:-1}" = 1 ]; then
  step overhead
  python3 bench/overhead.py --out "$R" --requests 2000 --warmup 200 --seconds 5 --fronts "${FRONTS:-0}"
  if [ -n "${FRONTS_AB:-}" ]; then
    python3 bench/overhead.py --out "$R/fronts_$FRONTS_AB" --requests 2000 --warmup 200 --seconds 5 --fronts "$FRONTS_AB"
  fi
fi

step "handler overhead"
python3 bench/handler_overhead.py --out "$R" --requests 1000

step "side lane (a resident model's request during a swap, one lane vs two)"
python3 bench/side_lane.py --out "$R" --rounds 30

step "remap cost (a swap's pages phase: remaps alone, beside kernels, beside queued copies)"
python3 bench/remap_cost.py --out "$R" --rounds 20

step "remaps beside another thread's Python, by switch interval"
python3 bench/worker_gil.py --out "$R"

if [ "$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)" -ge 2 ]; then
  step "peer copy probe (a worker mapping another worker's pages)"
  python3 bench/probe_peer.py --out "$R"
fi

WORK=$(mktemp -d /tmp/trace-work-XXXX)  # one artifact cache (the zoo exported once) for every trace run
AB_ARGS=()  # the node's settings; the A/Bs on one node replay with these (each alternates one setting itself)
[ -n "${LANES:-}" ] && AB_ARGS+=(--lanes "$LANES")
[ -n "${PIECE_MS:-}" ] && AB_ARGS+=(--swap-piece-ms "$PIECE_MS")
[ -n "${MAX_BATCH:-}" ] && AB_ARGS+=(--max-batch "$MAX_BATCH")
[ -n "${FRONTS:-}" ] && AB_ARGS+=(--fronts "$FRONTS")
LANE_ARGS=("${AB_ARGS[@]}")  # the sweeps: the same, and their replays and peer copies
[ -n "${REPEATS:-}" ] && LANE_ARGS+=(--repeats "$REPEATS")
[ "${PEER_COPIES:-0}" = 1 ] && LANE_ARGS+=(--peer-copies)
PROFILE_ARGS=()
[ "${PROFILE:-0}" = 1 ] && PROFILE_ARGS+=(--profile)
step "trace swapserve $SWEEP"
python3 bench/trace.py --out "$R" --policies swapserve --sweep "$SWEEP" --duration "$DURATION" --warmup "$WARMUP" --raw --work "$WORK" "${SLO[@]}" "${LANE_ARGS[@]}" "${PROFILE_ARGS[@]}"
SLO=(--slo-from "$R/trace.json")  # the table the first run used (measured there if no file had it)
if [ -n "${FRONTS_AB:-}" ]; then
  step "trace swapserve $SWEEP with $FRONTS_AB HTTP fronts (the A/B, in $R/fronts_$FRONTS_AB)"
  python3 bench/trace.py --out "$R/fronts_$FRONTS_AB" --policies swapserve --sweep "$SWEEP" --duration "$DURATION" --warmup "$WARMUP" --raw --work "$WORK" "${SLO[@]}" "${LANE_ARGS[@]}" "${PROFILE_ARGS[@]}" --fronts "$FRONTS_AB"
fi
if [ "${QUEUE_AHEAD_AB:-0}" = 1 ]; then
  step "trace swapserve $SWEEP without queue-ahead (the A/B, in $R/no_queue_ahead)"
  python3 bench/trace.py --out "$R/no_queue_ahead" --policies swapserve --sweep "$SWEEP" --duration "$DURATION" --warmup "$WARMUP" --raw --work "$WORK" "${SLO[@]}" "${LANE_ARGS[@]}" --no-queue-ahead
fi
if [ "${SIDE_FETCH_AB:-0}" = 1 ]; then
  step "trace swapserve $SWEEP, side fetches on and off alternately on one node (in $R/side_fetch_ab)"
  python3 bench/trace.py --out "$R/side_fetch_ab" --policies swapserve --sweep "$SWEEP" --duration "$DURATION" --warmup "$WARMUP" --raw --work "$WORK" "${SLO[@]}" "${AB_ARGS[@]}" --repeats $((2 * ${REPEATS:-1})) --alternate side_fetch=true,false
fi
if [ -n "${WITHIN_AB:-}" ]; then
  step "trace swapserve $SWEEP, queue-ahead with no limit and within $WITHIN_AB ms alternately on one node (in $R/within_ab)"
  python3 bench/trace.py --out "$R/within_ab" --policies swapserve --sweep "$SWEEP" --duration "$DURATION" --warmup "$WARMUP" --raw --work "$WORK" "${SLO[@]}" "${AB_ARGS[@]}" --repeats $((2 * ${REPEATS:-1})) --alternate "queue_ahead_within_ms=null,$WITHIN_AB"
fi
if [ "${PEER_AB:-0}" = 1 ]; then
  step "trace swapserve $SWEEP, peer copies off and on alternately on one node (in $R/peer_ab)"
  python3 bench/trace.py --out "$R/peer_ab" --policies swapserve --sweep "$SWEEP" --duration "$DURATION" --warmup "$WARMUP" --raw --work "$WORK" "${SLO[@]}" "${AB_ARGS[@]}" --repeats $((2 * ${REPEATS:-1})) --alternate peer_copies=false,true
fi
step "trace lru_ondemand $ONDEMAND_SWEEP"
python3 bench/trace.py --out "$R" --policies lru_ondemand --sweep "$ONDEMAND_SWEEP" --duration "$DURATION" --warmup "$WARMUP" --raw --work "$WORK" "${SLO[@]}" "${LANE_ARGS[@]}"
BASELINE_SWEEP=${BASELINE_SWEEP:-$SWEEP}
step "trace fifo_lru, dedicated $BASELINE_SWEEP"
python3 bench/trace.py --out "$R" --policies fifo_lru,dedicated --sweep "$BASELINE_SWEEP" --duration "$DURATION" --warmup "$WARMUP" --raw --work "$WORK" "${SLO[@]}" "${LANE_ARGS[@]}"
step done
