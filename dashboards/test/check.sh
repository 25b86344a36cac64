#!/usr/bin/env bash
# Static checks of dashboards/: the Prometheus configuration, the alert rules and their unit
# tests. Run by cli/tests/dashboards.rs (cargo test -p hoard-cli --test dashboards).
set -euo pipefail
cd "$(dirname "$0")/.."
promtool="${PROMTOOL:-promtool}"
"$promtool" check config prometheus.yml
"$promtool" check rules alerts.yml
"$promtool" test rules alerts.test.yml
