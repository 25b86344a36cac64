#!/usr/bin/env bash
# Lints Prometheus exposition text (names, units, help text) with `promtool check metrics`.
# Usage: check-metrics.sh FILE...  Fails if promtool reports any problem for any file.
set -euo pipefail
promtool="${PROMTOOL:-promtool}"
status=0
for file in "$@"; do
  if ! problems=$("$promtool" check metrics < "$file" 2>&1) || [ -n "$problems" ]; then
    printf '%s:\n%s\n' "$file" "$problems" >&2
    status=1
  fi
done
exit $status
