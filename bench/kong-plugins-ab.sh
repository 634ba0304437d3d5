#!/usr/bin/env bash
# Issue 5's plugin-overhead check: meshgate serving a decK file with key-auth + rate-limiting
# (local), against the same file without plugins, alternating ROUNDS times on one worker;
# prints req/s per run and the ratio of the medians. The upstream is the shared bench nginx.
#
#   bench/kong-plugins-ab.sh [ROUNDS] [DURATION_SECONDS]
set -euo pipefail
rounds=${1:-5}
duration=${2:-8}
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${MESHGATE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/meshgate/target}/release/meshgate}
shared=${SHARED_BENCH:-$repo/../shared/bench}
dir=$(mktemp -d /tmp/kong-ab.XXXXXX)
"$shared/upstream.sh" 18080 "$dir/upstream" >/dev/null 2>&1 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT
sleep 1
cat > "$dir/plain.yaml" <<'YAML'
_format_version: "3.0"
services:
- name: app
  url: http://127.0.0.1:18080
  routes:
  - name: all
    paths: [/]
YAML
cat > "$dir/plugins.yaml" <<'YAML'
_format_version: "3.0"
consumers:
- username: bench
  keyauth_credentials:
  - key: bench-key
services:
- name: app
  url: http://127.0.0.1:18080
  routes:
  - name: all
    paths: [/]
  plugins:
  - name: key-auth
  - name: rate-limiting
    config:
      second: 1000000000
      limit_by: consumer
      policy: local
YAML
run() {
  "$bin" proxy --config "$dir/$1.yaml" --listen 127.0.0.1:18100 --workers 1 --admin-addr 127.0.0.1:0 \
    --log-level warn >/dev/null 2>&1 &
  local pid=$!
  sleep 0.7
  wrk -t1 -c50 -d"${duration}s" -H "apikey: bench-key" http://127.0.0.1:18100/ | awk -v n="$1" '/Requests\/sec/ {print n, $2}'
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for _ in $(seq "$rounds"); do run plain; run plugins; done | tee "$dir/runs.txt"
median() { grep "^$1 " "$dir/runs.txt" | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
plain=$(median plain)
plugins=$(median plugins)
echo "median req/s: plain $plain, key-auth + rate-limiting $plugins"
awk -v a="$plugins" -v b="$plain" 'BEGIN {printf "ratio plugins/plain %.3f\n", a / b}'
