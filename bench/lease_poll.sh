#!/bin/bash
# The device tool's call that waits for a run script started in the background on a lent GPU machine:
#
#   setsid nohup bash SCRIPT > /dev/null 2>&1 < /dev/null & sleep 3; LIMIT=540 bash bench/lease_poll.sh
#
# and, while it prints STILL RUNNING, again at once (LIMIT=560 bash bench/lease_poll.sh, timeout 600): the device
# tool gives the machine back 30 s after a call ends, and with it whatever was running (session 28 lost a sweep
# so). Waits up to LIMIT seconds for RESULTS/session.log (bench/lease.sh's, default /tmp/res4) to say
# "=== all done", prints its RESULT, rc= and step lines, and tars RESULTS into $OUT/res4.tgz (the device tool
# brings back files at most two folders below $OUT: a tarball keeps a trace's trace_raw/).
# Where no session.log is there, the machine is a fresh one (the last was given back, and the run with it): it
# says so and ends within 10 s, not after LIMIT seconds of device time (session 35's late poll waited 560 s so).
#
# A script that ends within one call (the start and its run under ~9 min) runs in the call's foreground
# instead, with nothing to poll and nothing lost to a late next call:
#
#   timeout 520 bash SCRIPT > /dev/null 2>&1; LIMIT=5 bash bench/lease_poll.sh
RESULTS=${RESULTS:-/tmp/res4}
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -e "$RESULTS/session.log" ] && break; sleep 1; done  # a script just started
if [ ! -e "$RESULTS/session.log" ]; then
  echo "NO RUN HERE: $RESULTS/session.log is missing: a fresh machine (the one that ran the script was given back)"
  exit 1
fi
LIMIT=${LIMIT:-540}; t=0
while [ $t -lt "$LIMIT" ]; do
  grep -q "=== all done" "$RESULTS/session.log" 2>/dev/null && break
  sleep 5; t=$((t+5))
done
grep -E "RUN|RESULT|frozen|garbage|passed|rc=|failed|Error|===" "$RESULTS/session.log" | tail -60
tar -czf "$OUT/res4.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null; ls -la "$OUT"
grep -q "=== all done" "$RESULTS/session.log" && echo FINISHED || echo "STILL RUNNING"
