#!/usr/bin/env bash
# Candidate for ../shared/bench/compare.sh: routes everything on 127.0.0.1:LISTEN to
# 127.0.0.1:UPSTREAM through an Istio Gateway + VirtualService + ServiceEntry, with WORKERS
# worker threads. Usage (from the repo root):
#   CANDIDATE_NAME=meshgate \
#   CANDIDATE_CMD="$PWD/bench/meshgate-candidate.sh {LISTEN} {UPSTREAM} {WORKERS} {RUNDIR}" \
#   RUNS=3 ../shared/bench/compare.sh
# MESHGATE_BIN overrides the binary (default: the release build in CARGO_TARGET_DIR);
# scripts/build-pgo prints the path of a profile-guided build (docs/performance.md).

set -euo pipefail
listen=$1 upstream=$2 workers=$3 rundir=$4
here=$(cd "$(dirname "$0")" && pwd)
target=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshgate/target}
bin=${MESHGATE_BIN:-$target/release/meshgate}
mkdir -p "$rundir"
config=$rundir/meshgate-bench.yaml
cat > "$config" <<YAML
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bench
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: $listen
      name: http
      protocol: HTTP
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: upstream
spec:
  hosts: ["upstream.bench"]
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
    targetPort: $upstream
  endpoints:
  - address: 127.0.0.1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bench
spec:
  hosts: ["*"]
  gateways: ["bench"]
  http:
  - route:
    - destination:
        host: upstream.bench
YAML
exec "$bin" --log-level warn proxy --config "$config" --bind-address 127.0.0.1 \
  --workers "$workers" --admin-addr 127.0.0.1:0
