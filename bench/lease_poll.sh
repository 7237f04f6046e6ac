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
RESULTS=${RESULTS:-/tmp/res4}
LIMIT=${LIMIT:-540}; t=0
while [ $t -lt "$LIMIT" ]; do
  grep -q "=== all done" "$RESULTS/session.log" 2>/dev/null && break
  sleep 5; t=$((t+5))
done
grep -E "RUN|RESULT|frozen|garbage|passed|rc=|failed|Error|===" "$RESULTS/session.log" | tail -60
tar -czf "$OUT/res4.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null; ls -la "$OUT"
grep -q "=== all done" "$RESULTS/session.log" && echo FINISHED || echo "STILL RUNNING"
