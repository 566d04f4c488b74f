#!/usr/bin/env bash
# Lints and renders the chart with a real helm binary: `helm lint`, then
# `helm template` with the default values and with the optional Broker
# enabled, and checks that a bad value is refused by values.schema.json.
# The rendered Broker is validated against the CRD schema by
# `cargo test -p warren-crds` (examples) - here we check it renders.
# Usage: charts/check.sh [HELM]   (default: helm on PATH, else
# $HOME/.cache/warren/bin/helm, else install it with install-helm.sh)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
chart="$here/warren"
helm="${1:-}"
if [ -z "$helm" ]; then
    if command -v helm >/dev/null; then helm="$(command -v helm)";
    elif [ -x "$HOME/.cache/warren/bin/helm" ]; then helm="$HOME/.cache/warren/bin/helm";
    else helm="$("$here/install-helm.sh" | tail -n 1)"; fi
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "charts/check.sh: $("$helm" version --short)"
"$helm" lint --strict "$chart"
"$helm" lint --strict "$chart" --set broker.enabled=true

"$helm" template warren "$chart" --namespace warren-system > "$out/default.yaml"
"$helm" template warren "$chart" --namespace warren-system --set broker.enabled=true \
    --set operator.replicas=2 --set operator.watchNamespace=apps \
    --set 'operator.extraScaleTargets[0].apiGroup=argoproj.io' \
    --set 'operator.extraScaleTargets[0].resources[0]=rollouts' > "$out/broker.yaml"

expect() { # file, pattern, what
    grep -q -- "$2" "$1" || { echo "charts/check.sh: $3 missing from $(basename "$1")" >&2; exit 1; }
}
refuse() { # file, pattern, what
    if grep -q -- "$2" "$1"; then echo "charts/check.sh: $3 in $(basename "$1")" >&2; exit 1; fi
}
expect "$out/default.yaml" "kind: Deployment" "the operator Deployment"
expect "$out/default.yaml" "kind: ClusterRole$" "the ClusterRole"
expect "$out/default.yaml" "readOnlyRootFilesystem: true" "the read-only root filesystem"
expect "$out/default.yaml" 'image: "ghcr.io/warren-mq/warren-operator:0.1.0"' "the operator image at appVersion"
refuse "$out/default.yaml" "kind: Broker$" "a Broker although broker.enabled is false"
expect "$out/broker.yaml" "kind: Broker$" "the Broker instance"
expect "$out/broker.yaml" "kind: Role$" "the namespaced Role (watchNamespace)"
expect "$out/broker.yaml" '"rollouts/scale"' "the extra scale target"

# values.schema.json refuses bad values.
if "$helm" template warren "$chart" --set operator.logFormat=yaml >/dev/null 2>"$out/err"; then
    echo "charts/check.sh: values.schema.json accepted operator.logFormat=yaml" >&2; exit 1
fi
expect "$out/err" "logFormat" "the schema error naming logFormat"

# As a subchart: a parent's `global` values reach it without tripping the
# schema's additionalProperties: false.
mkdir -p "$out/parent"
cat > "$out/parent/Chart.yaml" <<EOF
apiVersion: v2
name: parent
version: 0.1.0
dependencies:
  - name: warren
    version: ">=0.0.0-0"
    repository: "file://$chart"
EOF
printf 'global:\n  imageRegistry: registry.example\nwarren:\n  operator:\n    replicas: 2\n' > "$out/parent/values.yaml"
"$helm" dependency update "$out/parent" >/dev/null
"$helm" template p "$out/parent" > "$out/parent.yaml"
expect "$out/parent.yaml" "replicas: 2" "the subchart's values from the parent"

# NOTES work from a packaged chart: no paths into the repository.
refuse "$chart/templates/NOTES.txt" "examples/" "a repository path in NOTES"

# The CRDs shipped in the chart are the generated ones.
for f in "$here"/../crds/generated/*.yaml; do
    cmp -s "$f" "$chart/crds/$(basename "$f")" || { echo "charts/check.sh: chart CRD $(basename "$f") differs from crds/generated (run crdgen)" >&2; exit 1; }
done
echo "charts/check.sh: ok"
