#!/usr/bin/env bash
# Builds the libFuzzer targets with a nightly toolchain and runs one for a
# bounded time, without needing cargo-fuzz installed (`cargo +nightly fuzz
# run TARGET` does the same where it is).
#
#   fuzz/run.sh topic 60        # 60 seconds of the topic matcher
#   fuzz/run.sh arguments 600   # ten minutes of the argument parsers
#
# Corpora go to fuzz/corpus/TARGET, crashes to fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")"
target="${1:?usage: fuzz/run.sh topic|arguments [seconds]}"
seconds="${2:-60}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# What cargo-fuzz passes, without a sanitizer (the targets are safe Rust);
# overflow checks and debug assertions stay on so that they count as crashes.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
cargo +nightly build --release --target "$triple" --bin "$target"
mkdir -p "corpus/$target" "artifacts/$target"
exec "$CARGO_TARGET_DIR/$triple/release/$target" "corpus/$target" -artifact_prefix="artifacts/$target/" \
  -max_total_time="$seconds" -max_len=512 -print_final_stats=1
