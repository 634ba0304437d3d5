#!/usr/bin/env bash
# Issue 4's overhead check: meshgate serving an Istio config with retries, outlier detection
# and connection-pool limits, against the same config without them, alternating ROUNDS times
# on one worker; prints req/s per run and the ratio of the medians. The upstream is the shared
# bench nginx.
#
#   bench/resilience-ab.sh [ROUNDS] [DURATION_SECONDS]
set -euo pipefail
rounds=${1:-5}
duration=${2:-8}
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${MESHGATE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/meshgate/target}/release/meshgate}
shared=${SHARED_BENCH:-$repo/../shared/bench}
dir=$(mktemp -d /tmp/resilience-ab.XXXXXX)
"$shared/upstream.sh" 18080 "$dir/upstream" >/dev/null 2>&1 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT
sleep 1
cat > "$dir/plain.yaml" <<'YAML'
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 18100, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: upstream}
spec:
  hosts: [upstream.bench]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 18080}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{destination: {host: upstream.bench}}]
    retries: {attempts: 0}
YAML
cat > "$dir/resilience.yaml" <<'YAML'
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 18100, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: upstream}
spec:
  hosts: [upstream.bench]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 18080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: upstream}
spec:
  host: upstream.bench
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10000, connectTimeout: 1s}
      http: {http1MaxPendingRequests: 10000, http2MaxRequests: 10000, maxRetries: 100}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{destination: {host: upstream.bench}}]
    timeout: 5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,connect-failure,reset"}
YAML
run() {
  "$bin" proxy --config "$dir/$1.yaml" --bind-address 127.0.0.1 --workers 1 --admin-addr 127.0.0.1:0 \
    --log-level warn >/dev/null 2>&1 &
  local pid=$!
  sleep 0.7
  wrk -t1 -c50 -d"${duration}s" http://127.0.0.1:18100/ | awk -v n="$1" '/Requests\/sec/ {print n, $2}'
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for _ in $(seq "$rounds"); do run plain; run resilience; done | tee "$dir/runs.txt"
median() { grep "^$1 " "$dir/runs.txt" | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
plain=$(median plain)
resilience=$(median resilience)
echo "median req/s: plain $plain, retries + outlier detection + connection pool $resilience"
awk -v a="$resilience" -v b="$plain" 'BEGIN {printf "ratio resilience/plain %.3f\n", a / b}'
