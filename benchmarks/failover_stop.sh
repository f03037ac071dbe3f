#!/usr/bin/env bash
# SIGTERM with a dead or hung peer: `epserve serve` (1 attention + 2 expert workers, the tiny demo
# checkpoint); one ExpertWorker process gets SIG$1 (KILL, STOP, or CONT for the undisturbed case);
# a completion goes through (it waits out the step timeout when the worker hangs); then SIGTERM, and
# the seconds until the server has exited.
#     bash benchmarks/failover_stop.sh KILL|STOP|CONT
set -u
SIGNAL=${1:-STOP}
LOG=$(mktemp)
epserve serve --expert-workers 2 --grpc-port 9100 --http-port 8100 > "$LOG" 2>&1 &
SERVER=$!
for _ in $(seq 180); do grep -q "^serving" "$LOG" && break; sleep 1; done
grep "^serving" "$LOG" || { cat "$LOG"; exit 1; }
WORKER=$(pgrep -f "ray::ExpertWorker" | tail -1)
echo "ExpertWorker $WORKER: SIG$SIGNAL"
kill -"$SIGNAL" "$WORKER"
start=$(date +%s.%N)
curl -s -m 60 http://127.0.0.1:8100/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "tiny-qwen35", "prompt": "hello", "max_tokens": 8}' | head -c 160; echo
echo "completion: $(echo "$(date +%s.%N) - $start" | bc) s"
start=$(date +%s.%N)
kill -TERM "$SERVER"
wait "$SERVER"
echo "SIGTERM -> exited (rc $?) in $(echo "$(date +%s.%N) - $start" | bc) s"
rm -f "$LOG"
