#!/usr/bin/env bash
# RabbitMQ's own load tool, PerfTest (com.rabbitmq:perf-test from Maven
# Central), as a cross-check of warren-bench's RabbitMQ figures: the same
# workload through PerfTest (Java) and through warren-bench's lapin client,
# alternating, against the same RabbitMQ, with medians side by side. If
# PerfTest does not get more out of RabbitMQ than lapin does, lapin's
# client cost is not what limits RabbitMQ's numbers.
#
#   bench/perftest.sh                                   # 1p1c and 4p4c, single node, classic v2 queue
#   bench/perftest.sh --target rabbitmq-cluster         # 3-node cluster, quorum queue
#   bench/perftest.sh --runs 5 --producers 4 --consumers 4
#   bench/perftest.sh --fetch-only                      # print the class path and exit
#
# Needs Java 17+ and Maven (to fetch the jar and its dependencies once; they
# are cached in ${WARREN_PERFTEST_CACHE:-~/.cache/warren/perftest}/<version>,
# outside the clone). Every other flag goes to `warren-bench perftest` (see
# its --help). Results go to ${WARREN_BENCH_JSON:-bench-results/perftest-<time>.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"

version="${PERFTEST_VERSION:-2.22.1}"
cache="${WARREN_PERFTEST_CACHE:-$HOME/.cache/warren/perftest}/$version"

log() { printf '==> %s\n' "$*" >&2; }

if [ ! -f "$cache/classpath.txt" ]; then
  command -v mvn >/dev/null || { echo "PerfTest needs Maven to fetch it (apt-get install -y maven)" >&2; exit 1; }
  log "fetching com.rabbitmq:perf-test:$version and its dependencies into $cache"
  mkdir -p "$cache"
  cat > "$cache/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.warren</groupId>
  <artifactId>perftest-fetch</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>com.rabbitmq</groupId>
      <artifactId>perf-test</artifactId>
      <version>$version</version>
    </dependency>
  </dependencies>
</project>
EOF
  (cd "$cache" && mvn -q -B dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime)
  ls "$cache"/lib/*.jar | tr '\n' ':' | sed 's/:$//' > "$cache/classpath.txt.tmp"
  mv "$cache/classpath.txt.tmp" "$cache/classpath.txt"
fi
if [ "${1:-}" = --fetch-only ]; then
  cat "$cache/classpath.txt"; echo
  exit 0
fi
command -v java >/dev/null || { echo "PerfTest needs Java 17+ (apt-get install -y openjdk-17-jre-headless)" >&2; exit 1; }

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  echo "RabbitMQ is not installed: run bench/compare.sh once, or apt-get install -y rabbitmq-server" >&2
  exit 1
fi
export PATH="$PATH:/usr/sbin"

log "building warren-bench (release)"
cargo build --release -q -p warren-bench

mkdir -p bench-results
json="${WARREN_BENCH_JSON:-bench-results/perftest-$(date +%Y%m%d-%H%M%S).json}"
exec "$CARGO_TARGET_DIR/release/warren-bench" perftest \
  --classpath "$(cat "$cache/classpath.txt")" --perftest-version "$version" --json "$json" "$@"
