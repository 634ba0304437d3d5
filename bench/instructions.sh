#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a deterministic measure
# for comparing two builds on a machine whose timings move 10-30 % between runs.
#
#   bench/instructions.sh [BIN] [h1|h2] [REQUESTS]
#
# Starts the benchmark upstream (nginx, as ../shared/bench/upstream.sh) and meshgate under
# valgrind with the candidate's config, zeroes the counters once meshgate serves, sends
# REQUESTS (default 20000) requests with h2load (HTTP/1.1 over 50 connections, or h2c over 10
# connections with 10 streams each), and prints instructions per request and the functions
# with the most instructions, inlined callees included. Needs valgrind and h2load
# (nghttp2-client).
# Ports 18190 (upstream) and 18191 (proxy) must be free. CALLGRIND_OPTS adds valgrind options
# (e.g. --dump-instr=yes to see which call sites in a function cost the most).

set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
target=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshgate/target}
bin=${1:-$target/release/meshgate}
mode=${2:-h1}
requests=${3:-20000}
work=$(mktemp -d /tmp/meshgate-instructions.XXXXXX)
upstream_port=18190
listen_port=18191

cleanup() {
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  [ -n "${upstream_pid:-}" ] && kill "$upstream_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$here/../../shared/bench/upstream.sh" "$upstream_port" "$work/upstream" >/dev/null 2>&1 &
upstream_pid=$!

# The candidate script writes the config and execs meshgate; run the same config under valgrind.
MESHGATE_BIN=/bin/true "$here/meshgate-candidate.sh" "$listen_port" "$upstream_port" 1 "$work" >/dev/null
valgrind --tool=callgrind ${CALLGRIND_OPTS:-} --callgrind-out-file="$work/callgrind.%p" \
  "$bin" --log-level warn proxy --config "$work/meshgate-bench.yaml" --bind-address 127.0.0.1 \
  --workers 1 --admin-addr 127.0.0.1:0 >"$work/valgrind.log" 2>&1 &
proxy_pid=$!
for _ in $(seq 150); do
  curl -sf "http://127.0.0.1:$listen_port/" >/dev/null && break
  sleep 0.2
done

callgrind_control -z "$proxy_pid" >/dev/null 2>&1
if [ "$mode" = h2 ]; then
  h2load -c10 -m10 -n "$requests" "http://127.0.0.1:$listen_port/" >/dev/null
else
  h2load --h1 -c50 -n "$requests" "http://127.0.0.1:$listen_port/" >/dev/null
fi
callgrind_control -d "$proxy_pid" >/dev/null 2>&1
sleep 1
dump=$(ls "$work"/callgrind.*.1)
total=$(awk '/^totals:/ {print $2}' "$dump")
echo "$(basename "$bin") $mode: $((total / requests)) instructions per request ($requests requests)"
callgrind_annotate --auto=no --inclusive=yes "$dump" 2>/dev/null | sed -n '/file:function/,$p' | sed -n '3,30p' || true
