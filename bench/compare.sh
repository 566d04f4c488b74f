#!/usr/bin/env bash
# Warren vs RabbitMQ in one command: installs and starts RabbitMQ if needed,
# builds Warren in release mode, runs the standard suite (each entry
# RUNS times per broker, alternating brokers), prints medians and
# Warren / RabbitMQ ratios, and writes every run as JSON.
#
#   bench/compare.sh                                   # the full suite, 5 runs
#   bench/compare.sh --runs 1 --duration 3s --warmup 1s --backlog 100000   # quick
#   bench/compare.sh --only 1p1c,1p1c-half-rate        # some entries
#   bench/compare.sh --list                            # the suite
#   bench/compare.sh --brokers warren,rabbitmq,warren-cluster,rabbitmq-cluster \
#       --only 1p1c,4p4c,quorum-1p1c,quorum-1p1c-half-rate,quorum-4p4c,quorum-4p4c-spread,failover,idle-queues
#                                                      # single node and 3-node quorum queues in one run
#
# Every flag is passed to `warren-bench compare` (see `--help`). Results go to
# ${WARREN_BENCH_JSON:-bench-results/compare-<time>.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; exit 1; fi
}

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  log "installing rabbitmq-server"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -q >/dev/null
  as_root apt-get install -y -q rabbitmq-server >/dev/null
fi
export PATH="$PATH:/usr/sbin"
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached
  # `-detached` returns before the node has registered with epmd, and
  # `await_startup` fails at once on a node it cannot find: wait for it.
  for _ in $(seq 60); do rabbitmqctl -q ping >/dev/null 2>&1 && break; sleep 1; done
fi
timeout 300 rabbitmqctl -q await_startup --timeout 240

log "building warren-broker and warren-bench (release)"
cargo build --release -q -p warren-broker -p warren-bench

mkdir -p bench-results
json="${WARREN_BENCH_JSON:-bench-results/compare-$(date +%Y%m%d-%H%M%S).json}"
log "running the suite (results: $json)"
exec "$CARGO_TARGET_DIR/release/warren-bench" compare \
  --warren-bin "$CARGO_TARGET_DIR/release/warren-broker" --json "$json" "$@"
