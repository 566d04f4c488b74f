#!/usr/bin/env bash
# What TLS and authentication cost: warren-bench's 1p1c workload (1 KiB
# persistent messages, confirms, one ack per message) against one broker in
# plain text, with TLS, and with TLS plus a static bearer token, RUNS times
# each, the three modes interleaved run by run; prints the medians and the
# ratios to plain text, and writes every run as JSON.
#
#   bench/security.sh                       # 3 runs per mode, 12 s each (2 s warm-up left out)
#   RUNS=7 DURATION=20s bench/security.sh
#   bench/security.sh --transient           # extra workload flags go to `warren-bench run`
#   WARREN_BENCH_BUSY="pgrep -x 'rustc|cargo'" bench/security.sh
#       on a shared machine: a command that succeeds while something else
#       loads it; each round (the three modes) starts once it fails, and a
#       round during which it succeeded is run again (at most RUNS times)
#
# Every run starts a fresh broker (release build) in a temporary directory
# on 127.0.0.1. Certificates (a CA and a server certificate for 127.0.0.1)
# are made with openssl; the clients get them, and the token, through the
# WARREN_* variables (WARREN_CA, WARREN_TOKEN) that every warren-bench
# client reads. Results go to ${WARREN_BENCH_JSON_DIR:-bench-results/security-<time>}.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"
runs="${RUNS:-3}"
duration="${DURATION:-12s}"
warmup="${WARMUP:-2s}"
out="${WARREN_BENCH_JSON_DIR:-bench-results/security-$(date +%Y%m%d-%H%M%S)}"

log() { printf '==> %s\n' "$*" >&2; }
for tool in openssl jq sha256sum; do
  command -v "$tool" >/dev/null || { echo "bench/security.sh needs $tool" >&2; exit 1; }
done

if [ -z "${WARREN_BENCH_SKIP_BUILD:-}" ]; then
  log "building warren-broker and warren-bench (release)"
  cargo build --release -q -p warren-broker -p warren-bench
fi
bin="$CARGO_TARGET_DIR/release"

pki="$(mktemp -d "${TMPDIR:-/tmp}/warren-bench-pki.XXXXXX")"
sampler=
trap 'rm -rf "$pki"; [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=warren-bench-ca \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$pki/tls.key" -out "$pki/tls.csr" 2>/dev/null
openssl x509 -req -in "$pki/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
  -copy_extensions copy -out "$pki/tls.crt" 2>/dev/null
token="$(openssl rand -hex 32)"
cat > "$pki/auth.toml" <<EOF
[[users]]
name = "bench"
permissions = { configure = ".*", write = ".*", read = ".*" }

[[tokens]]
user = "bench"
sha256 = "$(printf %s "$token" | sha256sum | cut -d' ' -f1)"
EOF

tls=(--broker-arg=--tls-cert --broker-arg="$pki/tls.crt" --broker-arg=--tls-key --broker-arg="$pki/tls.key")
auth=(--broker-arg=--auth-file --broker-arg="$pki/auth.toml")
modes=(plain tls tls-auth)
mkdir -p "$out"
log "1p1c $*, $runs runs per mode, $duration each ($warmup warm-up); JSON in $out"
busy="${WARREN_BENCH_BUSY:-}"
quiet() { [ -z "$busy" ] || ! sh -c "$busy" >/dev/null 2>&1; }
i=1
repeated=0
while [ "$i" -le "$runs" ]; do
  waited=0
  until quiet; do
    [ "$waited" -lt 3600 ] || { echo "bench/security.sh: still busy after an hour" >&2; exit 1; }
    sleep 5
    waited=$((waited + 5))
  done
  rm -f "$out/.busy"
  ( while sleep 0.5; do quiet || touch "$out/.busy"; done ) &
  sampler=$!
  for mode in "${modes[@]}"; do
    args=(run --broker warren --warren-bin "$bin/warren-broker" --producers 1 --consumers 1
          --duration "$duration" --warmup "$warmup" --json "$out/$mode-$i.json" "$@")
    case "$mode" in
      plain)    env -u WARREN_CA -u WARREN_TOKEN "$bin/warren-bench" "${args[@]}" >/dev/null ;;
      tls)      WARREN_CA="$pki/ca.crt" env -u WARREN_TOKEN "$bin/warren-bench" "${args[@]}" "${tls[@]}" >/dev/null ;;
      tls-auth) WARREN_CA="$pki/ca.crt" WARREN_TOKEN="$token" "$bin/warren-bench" "${args[@]}" "${tls[@]}" "${auth[@]}" >/dev/null ;;
    esac
    log "run $i $mode: $(jq -r '.runs[0] | "\(.publish_rate | floor) msg/s published, e2e p99 \(.end_to_end.p99_ms) ms"' "$out/$mode-$i.json")"
  done
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  if [ -e "$out/.busy" ] && [ "$repeated" -lt "$runs" ]; then
    repeated=$((repeated + 1))
    log "round $i ran while the machine was busy ($busy); running it again"
    continue
  fi
  i=$((i + 1))
done
rm -f "$out/.busy"
[ "$repeated" -eq 0 ] || log "$repeated round(s) repeated because the machine was busy"

median() { jq -s 'sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end'; }
metric() { for i in $(seq 1 "$runs"); do jq ".runs[0] | $2" "$out/$1-$i.json"; done | median; }
# Broker CPU per message consumed in the measured window, microseconds.
per_msg='.resources.broker_cpu_s / (.consume_rate * .window_s) * 1000000'
printf '\n%-10s %12s %12s %10s %10s %10s %12s\n' mode "publish/s" "consume/s" "e2e p50" "e2e p99" "conf p99" "cpu us/msg"
for mode in "${modes[@]}"; do
  printf '%-10s %12.0f %12.0f %10.2f %10.2f %10.2f %12.1f\n' "$mode" \
    "$(metric "$mode" .publish_rate)" "$(metric "$mode" .consume_rate)" "$(metric "$mode" .end_to_end.p50_ms)" \
    "$(metric "$mode" .end_to_end.p99_ms)" "$(metric "$mode" .confirm.p99_ms)" "$(metric "$mode" "$per_msg")"
done
# Ratios to plain text: of the medians, and the median of each round's
# ratio (the three modes of a round ran back to back, so a machine whose
# load drifts between rounds weighs less on it).
plain="$(metric plain .publish_rate)"
plain_cpu="$(metric plain "$per_msg")"
round_ratio() { for i in $(seq 1 "$runs"); do jq -n "$(jq ".runs[0] | $2" "$out/$1-$i.json") / $(jq ".runs[0] | $2" "$out/plain-$i.json")"; done | median; }
for mode in tls tls-auth; do
  printf '%s / plain: publish rate %.3f (median of rounds %.3f), broker CPU per message %.3f (median of rounds %.3f)\n' "$mode" \
    "$(jq -n "$(metric "$mode" .publish_rate) / $plain")" "$(round_ratio "$mode" .publish_rate)" \
    "$(jq -n "$(metric "$mode" "$per_msg") / $plain_cpu")" "$(round_ratio "$mode" "$per_msg")"
done
