#!/usr/bin/env bash
# live.sh: the dashboard and the alert rules against a real Prometheus scraping a real postern that has seen traffic.
#
#   1. promtool check rules grafana/alerts.yml; promtool test rules grafana/alerts_test.yml
#   2. starts, on free loopback ports with a temp config and storage: bench/dns_stub.py (NXDOMAIN at once, so
#      SPF/DKIM/DMARC finish), grafana/live_sink.py (the delivery target: 250, or 550/451 for bounce@/defer@),
#      postern (target/release/postern or $POSTERN: relay, submission, submissions, POP3, IMAP, metrics) and
#      Debian's prometheus (scrape and rule evaluation every 1 s, alerts.yml loaded)
#   3. grafana/live_traffic.py: mail from an outside address (127.0.0.2) that is accepted and delivered, rejected,
#      relay-refused, quarantined, rate-limited, a rule error, a bounce, a deferral, STARTTLS; POP3/IMAP logins good
#      and bad; a release over IMAP and one with `postern quarantine release`; a SIGHUP reload; then checks that
#      postern's counters moved
#   4. grafana/live_eval.py: after two more scrapes, every dashboard query and every alert expression through the
#      HTTP API; prints a table (query -> series); exit 1 if a dashboard query is empty or an alert expression fails
#   and stops everything it started, by PID.
#
# Needs: python3, curl, Linux /proc/net/tcp, Debian's prometheus package (installed with apt-get when missing and we are root).
# Env: POSTERN (target/release/postern) KEEP (1 = keep the temp dir) TMPDIR
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# shellcheck source=grafana/lib.sh
. "$HERE/lib.sh"
DASH=${DASH:-$HERE/postern.json}
POSTERN=${POSTERN:-$REPO/target/release/postern}
t0=$(date +%s.%N)

log() { echo "[live] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }

[ -x "$POSTERN" ] || die "no postern binary at $POSTERN (cargo build --release, or set POSTERN)"
need_prometheus 1 || die "prometheus/promtool are needed"

# ---------------------------------------------------------------- 1. the rule file, offline
log "promtool check rules grafana/alerts.yml"
promtool check rules "$HERE/alerts.yml" >&2
log "promtool test rules grafana/alerts_test.yml"
promtool test rules "$HERE/alerts_test.yml" >&2
N_ALERTS=$(grep -c '^ *- alert:' "$HERE/alerts.yml")

# ---------------------------------------------------------------- 2. servers on loopback
T=$(mktemp -d "${TMPDIR:-/tmp}/postern-live.XXXXXX")
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
listening() { # $1 port: a TCP socket in LISTEN state on it (/proc/net/tcp: no client connects, no tool needed)
  awk '$4 == "0A" { print $2 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -qi ":$(printf '%04X' "$1")\$"; }
wait_port() { # $1 port, $2 pid that must stay alive
  for _ in $(seq 300); do
    listening "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done; return 1; }

# Free ports, chosen by the kernel (so runs beside other tests do not collide).
read -r DNS SINK SMTP SUB SUBS POP3 IMAP METRICS PROM < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(9)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')

mkdir -p "$T/data" "$T/rules" "$T/policies" "$T/prom"
cp "$POSTERN" "$T/postern"
cp "$REPO"/rules/*.rhai "$T/rules/"
cat >"$T/rules/zz-live-check.rhai" <<'EOF'
// grafana/live.sh: one of each verdict the dashboard charts
fn data(m) {
    if m.subject == "live-check boom" { throw "live-check: a deliberate rule error"; }
    if m.subject == "live-check reject" { return reject(550, "5.7.1 live-check: refused by a rule"); }
    if m.subject == "live-check quarantine" { return quarantine("live-check"); }
}
EOF
cat >"$T/policies/ratelimits.toml" <<'EOF'
[[limit]]
name  = "live-check-per-sender"
key   = "sender"
rate  = "2/1h"
burst = 2
scope = "inbound"
EOF
PW="live-check-$RANDOM$RANDOM"
HASH=$(printf '%s\n' "$PW" | "$T/postern" passwd)
cat >"$T/policies/users.toml" <<EOF
[[user]]
login = "alice@example.test"
password = "$HASH"
addresses = ["alice@example.test"]
role = "user"
EOF
cat >"$T/postern.toml" <<EOF
[server]
hostname = "postern.live-check.test"
data_dir = "$T/data"
shutdown_grace = "2s"
[smtp]
relay = ["127.0.0.1:$SMTP"]
submission = ["127.0.0.1:$SUB"]
submissions = ["127.0.0.1:$SUBS"]
[relay]
domains = ["example.test"]
networks = ["127.0.0.1/32"]              # the client sends from 127.0.0.2: outside, so the checks run
[delivery]
route = "smtp://127.0.0.1:$SINK"         # grafana/live_sink.py
outbound = "smtp://127.0.0.1:$SINK"      # relayed mail and DSNs too
retry = ["1h"]                           # the deferred message stays deferred
[dns]
nameservers = ["127.0.0.1:$DNS"]         # bench/dns_stub.py: NXDOMAIN at once (SPF/DMARC "none")
[rules]
dir = "$T/rules"
on_error = "tempfail"
[policies]
dir = "$T/policies"
[quarantine]
pop3 = ["127.0.0.1:$POP3"]
imap = ["127.0.0.1:$IMAP"]
[metrics]
listen = "127.0.0.1:$METRICS"
EOF
# Prometheus first: its target discovery takes a few seconds before the first scrape, so that
# overlaps with postern's start (the scrapes before postern listens say up=0).
cp "$HERE/alerts.yml" "$T/prom/alerts.yml"
cat >"$T/prom/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [alerts.yml]
scrape_configs:
  - job_name: postern
    static_configs: [{targets: ["127.0.0.1:$METRICS"]}]
EOF
prometheus --config.file="$T/prom/prometheus.yml" --storage.tsdb.path="$T/prom/data" \
  --web.listen-address="127.0.0.1:$PROM" >"$T/prom/prometheus.log" 2>&1 &
PIDS+=($!)
wait_port "$PROM" "${PIDS[-1]}" || { tail -20 "$T/prom/prometheus.log" >&2; die "prometheus did not start"; }
"$T/postern" check --config "$T/postern.toml" >&2 || die "postern check refused the live config"

python3 "$REPO/bench/dns_stub.py" --port "$DNS" 2>"$T/dns.log" &
PIDS+=($!)
wait_port "$DNS" "${PIDS[-1]}" || die "bench/dns_stub.py did not start"
python3 "$HERE/live_sink.py" --port "$SINK" 2>"$T/sink.log" &
PIDS+=($!)
wait_port "$SINK" "${PIDS[-1]}" || die "live_sink.py did not start"
"$T/postern" serve --config "$T/postern.toml" >"$T/postern.log" 2>&1 &
PID_POSTERN=$!
PIDS+=($PID_POSTERN)
for p in "$SMTP" "$SUB" "$SUBS" "$POP3" "$IMAP" "$METRICS"; do
  wait_port "$p" "$PID_POSTERN" || { tail -20 "$T/postern.log" >&2; die "postern did not listen on $p"; }
done

log "postern listening after $(secs "$t0") s"
scraped=0
for _ in $(seq 150); do   # a first good scrape, so rate() sees the counters before the traffic
  if curl -fsS -G "http://127.0.0.1:$PROM/api/v1/query" --data-urlencode 'query=up{job="postern"} == 1' 2>/dev/null \
    | grep -q '"job":"postern"'; then scraped=1; break; fi
  sleep 0.2
done
[ "$scraped" = 1 ] || { tail -20 "$T/prom/prometheus.log" >&2; die "prometheus did not scrape postern within 30 s"; }
log "postern smtp :$SMTP sub :$SUB subs :$SUBS pop3 :$POP3 imap :$IMAP metrics :$METRICS; sink :$SINK; dns :$DNS; prometheus :$PROM; temp $T"
log "ready after $(secs "$t0") s"

# ---------------------------------------------------------------- 3. traffic
rc=0
python3 "$HERE/live_traffic.py" --postern "$T/postern" --config "$T/postern.toml" --pid "$PID_POSTERN" \
  --smtp "$SMTP" --submission "$SUB" --submissions "$SUBS" --pop3 "$POP3" --imap "$IMAP" \
  --metrics "$METRICS" --password "$PW" || rc=1
t_end=$(date +%s.%N)

# ---------------------------------------------------------------- 4. every query through the HTTP API
log "every dashboard query and alert expression, via http://127.0.0.1:$PROM/api/v1/query (after two more scrapes)"
python3 "$HERE/live_eval.py" "$DASH" "http://127.0.0.1:$PROM" --after "$t_end" --alerts "$N_ALERTS" || rc=1
grep -iE 'level=(error|warn)' "$T/prom/prometheus.log" | grep -v 'Error on ingesting samples' >&2 || true
log "live check $([ "$rc" = 0 ] && echo passed || echo FAILED) in $(secs "$t0") s"
exit $rc
