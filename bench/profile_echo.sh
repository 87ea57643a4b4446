#!/bin/sh
# Where the time goes: perf with DWARF call graphs on `python -m lightws echo` under one
# echo load, then each thread's samples (the event-loop thread "python" and the tokio
# thread "lightws-io") put in buckets, as µs per echoed message and as a share.
#
#   bench/profile_echo.sh [PYTHON] [SIZE] [CONNECTIONS]     # default: python 64 100
#   bench/profile_echo.sh .venv/bin/python 64KiB 10
#
# Needs perf and an extension built with the loadgen feature. A sample is 250 µs of CPU
# (perf's default 4 kHz); µs/msg divides by the echoes counted during the recording.
set -eu
PY=${1:-python}; SIZE=${2:-64}; CONNS=${3:-100}
OUT=$(mktemp -d)
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$PY -m lightws echo --addr 127.0.0.1:$PORT >/dev/null 2>&1 & SRV=$!
sleep 1.5
$PY -m lightws bench ws://127.0.0.1:$PORT/ -c $CONNS -s $SIZE -d 6 --warmup 1 --json -q >"$OUT/bench.json" & LOAD=$!
sleep 2.5
perf record --call-graph dwarf,16384 -o "$OUT/perf.data" -p $SRV -- sleep 2 >/dev/null 2>&1
wait $LOAD; kill $SRV; wait $SRV 2>/dev/null || true
MSGS=$($PY -c "import json; r = json.load(open('$OUT/bench.json')); print(r['msgs_per_s'] * 2)")
echo "$SIZE x $CONNS: $($PY -c "import json; print(round(json.load(open('$OUT/bench.json'))['msgs_per_s']))") msgs/s over the run; profile in $OUT/perf.data"
perf script -i "$OUT/perf.data" 2>/dev/null >"$OUT/script.txt"
for THREAD in python lightws-io; do
  echo "## thread $THREAD: µs/msg, share"
  awk -v COMM=$THREAD -v MSGS="$MSGS" '
  BEGIN { RS = "" }
  $0 ~ "^" COMM " " {
    t++
    n = split($0, L, "\n"); top = ""
    for (i = 2; i <= n; i++) if (L[i] !~ /\(inlined\)/) { top = L[i]; break }
    if ($0 ~ /sendto|sendmsg|writev|__libc_send/) k = "kernel: send/writev (loopback TCP, incl. the peer'"'"'s receive)"
    else if ($0 ~ /recvfrom|__libc_recv|readv/) k = "kernel: recv"
    else if ($0 ~ /epoll_wait/) k = "kernel: epoll_wait (sleep, wake-up)"
    else if ($0 ~ /waker::Waker::wake|__GI___libc_write/) k = "kernel: eventfd write (waking the other thread)"
    else if ($0 ~ /__GI___libc_read/) k = "kernel: hub eventfd read"
    else if (top ~ /kallsyms/) k = "kernel: other (faults, IRQs)"
    else if ($0 ~ /PyBytes_FromStringAndSize/ && L[2] ~ /mem(move|cpy)/) k = "memcpy: payload into bytes (Message)"
    else if ($0 ~ /encode_frame/ && L[2] ~ /mem(move|cpy)/) k = "memcpy: payload into the outbox (send)"
    else if (L[2] ~ /mem(move|cpy)/) k = "memcpy: other (read buffer -> message)"
    else if (top ~ /_asyncio/) k = "_asyncio C (Future, Task)"
    else if (top ~ /_lightws/) k = "lightws (Rust: bridge, driver, session, tokio)"
    else if (top ~ /libpython/) k = "CPython (eval loop, objects, calls; asyncio Python code)"
    else if (top ~ /libc\.so/) k = "libc (malloc/free, other)"
    else k = "other"
    a[k]++
  }
  END {
    for (k in a) printf "%7.2f %5.1f%%  %s\n", a[k] * 250 / MSGS, 100 * a[k] / t, k
    printf "%7.2f 100.0%%  total (%d samples)\n", t * 250 / MSGS, t
  }' "$OUT/script.txt" | sort -rn
done
