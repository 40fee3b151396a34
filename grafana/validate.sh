#!/usr/bin/env bash
# validate.sh — check grafana/postern.json; installs what it needs. CI may call it.
#
#   grafana/validate.sh          offline (no network, no server):
#                                  1. ../shared/tools/validate_dashboard.py: grafana-foundation-sdk typed round trip
#                                     (unknown/misplaced fields), uid/title/ids/gridPos, `promtool check rules` on every expr
#                                  2. grafana/check_spec.py: every SPEC.md metric charted, no unknown metric or label
#   grafana/validate.sh --live   the above, then starts postern (target/release/postern, or $POSTERN) and a Prometheus
#                                on loopback ports with temp config and storage, drives a little mail through postern
#                                (accepted, rate-limited, rule error, quarantined), lets Prometheus scrape it, runs
#                                validate_dashboard.py --prom (every query must return data), and stops both by PID.
#
# Needs: python3 (venv), PyPI grafana-foundation-sdk (pinned below, into $VENV), promtool (Debian package `prometheus`,
# installed with apt-get when missing and we are root; its daemon is not started). --live also needs `prometheus`
# (same package) and a postern binary.
# Env: VENV (~/.cache/postern-grafana-venv) SHARED (../shared) POSTERN PROM_PORT (9091) METRICS_PORT (9727)
#      SMTP_PORT (2601) DNS_PORT (5354, bench/dns_stub.py: answers NXDOMAIN at once) KEEP (0|1 keep the temp dir of --live)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DASH=${DASH:-$HERE/postern.json}
SHARED=${SHARED:-$REPO/../shared}
VALIDATOR=$SHARED/tools/validate_dashboard.py
SPEC=$SHARED/SPEC.md
SDK_SPEC='grafana-foundation-sdk==1769699379!11.6.0'   # the SDK's models for Grafana 11.6 (schemaVersion 41)
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/postern-grafana-venv}
LIVE=0; [ "${1:-}" = "--live" ] && LIVE=1

log() { echo "[validate] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -f "$VALIDATOR" ] || die "no validator at $VALIDATOR (set SHARED=path/to/shared)"
[ -f "$SPEC" ] || die "no SPEC.md at $SPEC"

# ---------------------------------------------------------------- dependencies
if ! "$VENV/bin/python" -c 'import grafana_foundation_sdk' 2>/dev/null; then
  log "installing $SDK_SPEC into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$SDK_SPEC" >&2
fi
if ! command -v promtool >/dev/null || { [ "$LIVE" = 1 ] && ! command -v prometheus >/dev/null; }; then
  [ "$(id -u)" = 0 ] || die "promtool missing: install Debian's 'prometheus' package (root needed)"
  log "installing Debian package prometheus (promtool); its service is not started"
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # deny service starts during the install
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  apt-get update >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# ---------------------------------------------------------------- offline
rc=0
log "validate_dashboard.py $DASH"
"$VENV/bin/python" "$VALIDATOR" "$DASH" || rc=1
log "check_spec.py $DASH $SPEC"
python3 "$HERE/check_spec.py" "$DASH" "$SPEC" || rc=1
[ "$LIVE" = 1 ] || exit $rc

# ---------------------------------------------------------------- live: postern + prometheus on loopback
POSTERN=${POSTERN:-$REPO/target/release/postern}
[ -x "$POSTERN" ] || die "no postern binary at $POSTERN (cargo build --release)"
PROM_PORT=${PROM_PORT:-9091}
METRICS_PORT=${METRICS_PORT:-9727}
SMTP_PORT=${SMTP_PORT:-2601}
DNS_PORT=${DNS_PORT:-5354}
T=$(mktemp -d "${TMPDIR:-/tmp}/postern-grafana.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
wait_port() { # $1 port [$2 pid that must stay alive]
  for _ in $(seq 200); do
    ss -ltn "sport = :$1" | grep -q LISTEN && return 0
    [ -z "${2:-}" ] || kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done; return 1; }
for p in "$PROM_PORT" "$METRICS_PORT" "$SMTP_PORT" "$DNS_PORT"; do
  ! ss -ltn "sport = :$p" | grep -q LISTEN || die "port $p is busy"
done

mkdir -p "$T/data" "$T/rules" "$T/policies" "$T/prom"
cp "$POSTERN" "$T/postern"
cp "$REPO"/rules/*.rhai "$T/rules/" 2>/dev/null || true
cat >"$T/rules/zz-live-check.rhai" <<'EOF'
// grafana/validate.sh --live: makes the rule metrics move
fn data(m) {
    if m.subject == "live-check boom" { throw "live-check: a deliberate rule error"; }
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
cat >"$T/postern.toml" <<EOF
[server]
hostname = "postern.live-check.test"
data_dir = "$T/data"
[smtp]
relay = ["127.0.0.1:$SMTP_PORT"]
submission = []
submissions = []
[relay]
domains = ["example.test"]
networks = ["127.0.0.0/8"]
[delivery]
route = "maildir:$T/data/maildir"
retry = ["1s"]
[dns]
nameservers = ["127.0.0.1:$DNS_PORT"]   # bench/dns_stub.py: NXDOMAIN at once (SPF/DMARC "none")
[rules]
dir = "$T/rules"
on_error = "tempfail"
[policies]
dir = "$T/policies"
[quarantine]
pop3 = []
pop3s = []
imap = []
imaps = []
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
EOF
python3 "$REPO/bench/dns_stub.py" --port "$DNS_PORT" 2>"$T/dns.log" &
PIDS+=($!)
"$T/postern" serve --config "$T/postern.toml" >"$T/postern.log" 2>&1 &
PIDS+=($!)
wait_port "$SMTP_PORT" "${PIDS[-1]}" && wait_port "$METRICS_PORT" "${PIDS[-1]}" || { tail -20 "$T/postern.log" >&2; die "postern did not start"; }

cat >"$T/prom/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: postern
    static_configs: [{targets: ["127.0.0.1:$METRICS_PORT"]}]
EOF
prometheus --config.file="$T/prom/prometheus.yml" --storage.tsdb.path="$T/prom/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$T/prom/prometheus.log" 2>&1 &
PIDS+=($!)
wait_port "$PROM_PORT" "${PIDS[-1]}" || { tail -20 "$T/prom/prometheus.log" >&2; die "prometheus did not start"; }
log "postern 127.0.0.1:$SMTP_PORT (metrics :$METRICS_PORT), prometheus 127.0.0.1:$PROM_PORT, temp $T"

# a little mail: accepted, rate-limited, a rule error, a quarantine; then wait for scrapes
python3 - "$SMTP_PORT" <<'EOF' >&2
import smtplib, sys, time
port = int(sys.argv[1])
def send(sender, subject):
    msg = f"From: <{sender}>\r\nTo: <user@example.test>\r\nSubject: {subject}\r\n\r\nlive check\r\n"
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail(sender, ["user@example.test"], msg)
        return "250"
    except smtplib.SMTPResponseException as e:
        return str(e.smtp_code)
    except smtplib.SMTPRecipientsRefused as e:
        return "rcpt " + str(list(e.recipients.values())[0][0])
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
for round_ in range(3):           # spread over several scrapes so rate() has points
    out = [send(f"sender{round_}-{i}@example.test", "live-check ok") for i in range(5)]
    out += [send("flood@example.test", "live-check flood") for _ in range(3)]
    out += [send(f"boom{round_}@example.test", "live-check boom")]
    out += [send(f"q{round_}@example.test", "live-check quarantine")]
    print("[validate] traffic round", round_, "replies:", " ".join(out))
    time.sleep(2)
EOF
sleep 5
log "postern /metrics has: $(curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" | grep -o '^postern_[a-z_]*' | sed 's/_bucket$\|_sum$\|_count$//' | sort -u | tr '\n' ' ')"
log "validate_dashboard.py --prom http://127.0.0.1:$PROM_PORT"
"$VENV/bin/python" "$VALIDATOR" "$DASH" --prom "http://127.0.0.1:$PROM_PORT" || rc=1
exit $rc
