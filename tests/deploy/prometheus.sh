#!/usr/bin/env bash
# A real Prometheus (Debian's package) scraping the daemon with deploy/prometheus/: its
# scrape config with a test override (1 s scrape and evaluation intervals, the target
# at the daemon's metrics address), its alert rules unchanged. Checks, through
# Prometheus' HTTP API:
#   up == 1 for the job; every query of deploy/grafana/sv2-tpd.json (and its variables)
#   returns data; the no-node-serves expression is empty while the node serves; stopping
#   the node makes the node-down warning (Sv2TpdNodeDisconnected, for node `default`) and
#   the no-node-serves page (Sv2TpdNoNodeServes) fire, each after the rule's own `for:`.
#
#   bash tests/deploy/prometheus.sh
# Needs BITCOIN_NODE and the daemon's binary (SV2_TPD_TEST_BIN, default target/debug/sv2-tpd).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

sv2_tpd="${SV2_TPD_TEST_BIN:-$REPO/target/debug/sv2-tpd}"
command -v prometheus >/dev/null || fail "prometheus is not installed (.ci/run installs it)"
work=$(mktemp -d)
daemon_pid=
prometheus_pid=
cleanup() {
    local pid
    for pid in $prometheus_pid $daemon_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    node_stop
    rm -rf "$work"
}
trap cleanup EXIT

node_start "$work/bitcoin"
metrics="127.0.0.1:$(free_port)"
"$sv2_tpd" run --chain regtest --ipc-socket "$(node_socket)" --datadir "$work/tpd" \
    --sv2-port "$(free_port)" --metrics-bind "$metrics" 2>"$work/daemon.log" &
daemon_pid=$!

# deploy/prometheus/prometheus.yml with the test override; each change must apply.
override() {
    local pattern="$1" replacement="$2"
    grep -qE "$pattern" "$work/prometheus.yml" ||
        fail "deploy/prometheus/prometheus.yml no longer has /$pattern/ for the test override"
    sed -i -E "s|$pattern|$replacement|" "$work/prometheus.yml"
}
cp "$REPO/deploy/prometheus/prometheus.yml" "$REPO/deploy/prometheus/sv2-tpd-alerts.yml" "$work/"
override '^(  scrape_interval:) .*' '\1 1s'
override '^(  evaluation_interval:) .*' '\1 1s'
override '^( +- )127\.0\.0\.1:9842$' "\\1$metrics"
promtool check config "$work/prometheus.yml" >&2

api="http://127.0.0.1:$(free_port)"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="${api#http://}" --log.level=warn 2>"$work/prometheus.log" &
prometheus_pid=$!
wait_for 60 "Prometheus to be ready" curl -sf "$api/-/ready"

# query EXPR: the instant query's result list (JSON), empty when there is none.
query() { curl -sf "$api/api/v1/query" --data-urlencode "query=$1" | jq -c '.data.result'; }
has_data() { [ "$(query "$1" | jq length)" -gt 0 ]; }
up_is_1() { [ "$(query 'up{job="sv2-tpd"}' | jq -r '.[0].value[1]')" = 1 ]; }
wait_for 60 'up{job="sv2-tpd"} == 1' up_is_1
# The one node of a single-node setup is named `default` in the node series.
connected() { [ "$(query 'sv2_tpd_node_connected{job="sv2-tpd",node="default"}' | jq -r '.[0].value[1]')" = 1 ]; }
wait_for 60 "the daemon's node connection in Prometheus" connected
say "Prometheus scrapes the daemon: up == 1"

# The dashboard's queries, with Grafana's variables as it would fill them in
# ($__rate_interval is four scrape intervals).
instance=$(query 'up{job="sv2-tpd"}' | jq -r '.[0].metric.instance')
jq -r '.. | objects | select(has("expr")) | .expr' "$REPO/deploy/grafana/sv2-tpd.json" |
    sed -e 's/\$job/sv2-tpd/g' -e "s/\\\$instance/$instance/g" -e 's/\$__rate_interval/4s/g' \
        >"$work/queries"
count=0
while IFS= read -r expr; do
    wait_for 30 "data for the dashboard's $expr" has_data "$expr"
    count=$((count + 1))
done <"$work/queries"
((count > 10)) || fail "only $count queries found in the dashboard"
for variable in job instance; do
    values=$(curl -sfG "$api/api/v1/label/$variable/values" \
        --data-urlencode 'match[]=sv2_tpd_node_connected' | jq -c .data)
    [ "$values" != "[]" ] || fail "the dashboard's \$$variable variable has no values"
done
say "all $count dashboard queries and its variables return data"

# rule_line ALERT KEY: the ALERT rule's `KEY: ...` line (its expr, its for), without the key.
rule_line() {
    awk -v alert="- alert: $1" -v key="$2:" '
        index($0, alert) { inside = 1; next }
        inside && /- alert:/ { exit }
        inside && $1 == key { sub(/^ *[a-z]+: */, ""); print; exit }' "$work/sv2-tpd-alerts.yml"
}
no_node_serves=$(rule_line Sv2TpdNoNodeServes expr)
[ -n "$no_node_serves" ] || fail "no expr for Sv2TpdNoNodeServes in the rules"
no_data() { [ "$(query "$1" | jq length)" -eq 0 ]; }
wait_for 30 "Sv2TpdNoNodeServes's expression to be empty while the node serves" no_data "$no_node_serves"
say "Sv2TpdNoNodeServes's expression is empty while the node serves"

say "stopping the node"
node_stop
started=$SECONDS
# firing ALERT [LABEL VALUE]: ALERT fires (with LABEL=VALUE, when given).
firing() {
    curl -sf "$api/api/v1/alerts" |
        jq -e --arg alert "$1" --arg name "${2:-alertname}" --arg want "${3:-$1}" \
            '.data.alerts[] | select(.labels.alertname == $alert and .labels[$name] == $want and .state == "firing")'
}
for alert in "Sv2TpdNodeDisconnected node default" Sv2TpdNoNodeServes; do
    read -r name label value <<<"$alert"
    rule_for=$(rule_line "$name" for)
    wait_for 180 "$name to fire (for: $rule_for)" firing "$name" $label $value
    say "$name fired $((SECONDS - started))s after the node stopped (for: $rule_for)"
done
curl -sf "$api/api/v1/alerts" | jq -c '.data.alerts[] | {alert: .labels.alertname, state}' >&2
say "passed"
