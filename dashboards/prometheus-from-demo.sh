#!/usr/bin/env bash
# Writes a Prometheus configuration for a running `hoard demo --serve` from the addresses it
# printed (the demo picks free ports). Usage:
#   hoard demo --serve | tee demo.log        # in one terminal
#   dashboards/prometheus-from-demo.sh demo.log > /tmp/hoard-prometheus.yml
#   prometheus --config.file=/tmp/hoard-prometheus.yml --storage.tsdb.path=/tmp/hoard-prometheus
# The job names are those of prometheus.yml (the dashboards and alerts select on them).
# HOARD_SCRAPE_INTERVAL (default 5s) sets the scrape and rule evaluation interval.
set -euo pipefail
log="${1:?usage: prometheus-from-demo.sh DEMO_OUTPUT_FILE}"
dir="$(cd "$(dirname "$0")" && pwd)"
gateway=$(sed -n 's|.*gateway metrics: *http://\([^/]*\)/metrics.*|"\1"|p' "$log" | head -n 1)
replicas=$(sed -n 's|.*replica [0-9]* metrics: *http://\([^/]*\)/metrics.*|"\1"|p' "$log" | paste -sd, -)
if [ -z "$gateway" ] || [ -z "$replicas" ]; then
  echo "no 'gateway metrics:' or 'replica N metrics:' lines in $log (is the demo still starting?)" >&2
  exit 1
fi
cat <<YAML
global:
  scrape_interval: ${HOARD_SCRAPE_INTERVAL:-5s}
  evaluation_interval: ${HOARD_SCRAPE_INTERVAL:-5s}
rule_files:
  - $dir/alerts.yml
scrape_configs:
  - job_name: hoard-gateway
    static_configs:
      - targets: [$gateway]
  - job_name: hoard-replicas
    static_configs:
      - targets: [$replicas]
YAML
