#!/usr/bin/env bash
# Static checks of dashboards/: the Prometheus configuration, the alert rules and their unit
# tests. Run by cli/tests/dashboards.rs (cargo test -p hoard-cli --test dashboards).
set -euo pipefail
cd "$(dirname "$0")/.."
promtool="${PROMTOOL:-promtool}"
"$promtool" check config prometheus.yml
"$promtool" check rules alerts.yml
"$promtool" test rules alerts.test.yml
# The scrape configuration generated from `hoard demo --serve` output (sample in demo-output.txt).
generated="$(mktemp)"
trap 'rm -f "$generated"' EXIT
./prometheus-from-demo.sh test/demo-output.txt > "$generated"
grep -q '"127.0.0.1:5003"' "$generated"
"$promtool" check config "$generated"
