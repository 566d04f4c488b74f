#!/usr/bin/env bash
# Fails when the committed CRD YAML differs from what the Rust types generate.
# Regenerates crds/generated/ and charts/warren/crds/ with crdgen, then asks
# git whether anything changed (untracked files count as drift too).
# Usage: crds/check.sh   (from anywhere; honours CARGO_TARGET_DIR)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo run --quiet -p warren-crds --bin crdgen -- --root "$root"
paths=(crds/generated charts/warren/crds)
if ! git diff --exit-code -- "${paths[@]}"; then
    echo "crds/check.sh: the committed CRD YAML is stale; run 'cargo run -p warren-crds --bin crdgen' and commit the result" >&2
    exit 1
fi
untracked="$(git ls-files --others --exclude-standard -- "${paths[@]}")"
if [ -n "$untracked" ]; then
    echo "crds/check.sh: generated CRD files are not committed:" >&2
    echo "$untracked" >&2
    exit 1
fi
echo "crds/check.sh: CRD YAML is up to date"
