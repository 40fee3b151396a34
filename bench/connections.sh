#!/usr/bin/env bash
# connections.sh — floods and slow clients (issue 8): Postern under 10 000 connections.
#
# Starts its own postern (relay, implicit TLS submission, maildir backend), a loopback DNS
# stub, and drives bench/flood.py through four phases; prints one table.
#
#   hold        N (10000) SMTP connections from 250 source addresses 127.0.10-11.x, half silent and
#               half trickling a NOOP a byte every 3 s, held HOLD (60) s: RSS, bytes per connection,
#               a fresh client's greeting time and its message delivered; EXCESS (300) more beyond
#               max_connections (N + 100) get 421; 60 from one address beyond the per-IP cap 50 get 421
#   slowloris   SLOW (2000) clients in DATA sending a byte every 3 s: cut off by data_timeout (20 s)
#   tls-silent  TLS (1000) silent connections to 465 and TLS stalled after STARTTLS: dropped after
#               handshake_timeout (5 s); a fresh client on the relay port meanwhile
#   senders     SENDERS (1000000) distinct MAIL FROM through a per-sender limit: RSS per key, and
#               after the limiter's housekeeping (60 s; keys idle past their refill are dropped)
#
# Env: N HOLD EXCESS SLOW TLS SENDERS (0 skips a phase) HOLD_ROUNDS (1; more: RSS after each further round) POSTERN (target/release/postern) KEEP (0|1)
# Everything is on loopback; `ulimit -n` is raised here. Processes started here are stopped by PID.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
N=${N:-10000} HOLD=${HOLD:-60} EXCESS=${EXCESS:-300} SLOW=${SLOW:-2000} TLS=${TLS:-1000}
SENDERS=${SENDERS:-1000000}
POSTERN=${POSTERN:-$REPO/target/release/postern}
KEEP=${KEEP:-0}
RELAY=2700 TLSPORT=2701 METRICS=9727 DNSPORT=5356
log() { echo "[connections] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ -x "$POSTERN" ] || die "no postern at $POSTERN (cargo build --release)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge $((N + 2000)) ] || die "ulimit -n is $(ulimit -n): need $((N + 2000)) (raise the hard limit)"

T=$(mktemp -d "${TMPDIR:-/tmp}/postern-conn.XXXXXX")
PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; kill -KILL "$p" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM
wait_port() { for _ in $(seq 200); do ss -ltn "sport = :$1" | grep -q LISTEN && return 0; sleep 0.1; done; return 1; }

python3 "$HERE/dns_stub.py" --port $DNSPORT 2>"$T/dns.log" & PIDS+=($!)
mkdir -p "$T/data" "$T/policies" "$T/rules"
cp "$REPO"/rules/*.rhai "$T/rules/"
cat >"$T/policies/ratelimits.toml" <<EOF
# 1 000 000 distinct senders each use one token; a key idle for 10 s is full again
# and is dropped by the next housekeeping.
[[limit]]
name = "per-sender"
key = "sender"
rate = "10/10s"
burst = 10
scope = "inbound"
action = "tempfail"
EOF
cat >"$T/postern.toml" <<EOF
# written by bench/connections.sh
[server]
hostname = "postern.flood.test"
data_dir = "$T/data"

[smtp]
relay = ["127.0.0.1:$RELAY"]
submission = []
submissions = ["127.0.0.1:$TLSPORT"]
max_connections = $((N + 100))
max_connections_per_ip = 50
connection_rate_per_ip = "120/1m"
idle_timeout = "5m"
handshake_timeout = "5s"
data_timeout = "20s"

[relay]
domains = ["example.net"]
networks = ["127.0.0.1/32"]          # every other 127.x address is an outside client

[delivery]
route = "maildir:$T/maildir"

[dns]
nameservers = ["127.0.0.1:$DNSPORT"]

[rules]
dir = "$T/rules"

[policies]
dir = "$T/policies"

[quarantine]
pop3 = []
pop3s = []
imap = []
imaps = []

[metrics]
listen = "127.0.0.1:$METRICS"
EOF
cp "$POSTERN" "$T/postern"
start_postern() {
  POSTERN_LOG=${POSTERN_LOG:-"warn,postern::policy::watch=debug"} "$T/postern" serve --config "$T/postern.toml" >>"$T/postern.log" 2>&1 & PID=$!
  PIDS+=($PID)
  wait_port $RELAY || { tail -20 "$T/postern.log" >&2; die "postern did not start"; }
}
start_postern
log "postern pid $PID, data $T (soft fd limit of this shell $(ulimit -n); postern's: $(awk '/open files/ {print $4}' /proc/$PID/limits))"

delivered() { find "$T/maildir" -type f -path '*/new/*' 2>/dev/null | xargs -r grep -l "Subject: $1" 2>/dev/null | wc -l; }
flood() { python3 "$HERE/flood.py" "$@" --port $RELAY --tls-port $TLSPORT --pid "$PID"; }
row() { printf '| %-44s | %s |\n' "$1" "$2"; }

OUT=$T/results
: >"$OUT"
if [ "$N" -gt 0 ]; then
  log "hold: $N connections for ${HOLD}s"
  flood hold -n "$N" --hold "$HOLD" --excess "$EXCESS" --per-ip 50 --per-ip-extra 10 --every 3 >"$T/hold.json"
  sleep 2
  python3 - "$T/hold.json" "$(delivered fresh-hold)" >>"$OUT" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); d = sys.argv[2]
o = r["open"]; e = r["excess"]; p = r["per_ip"]
print(f"| {o['220']} connections held {r['alive_after_hold']} alive after the hold (half trickling) | opened in {r['open_seconds']} s; 421: {o['421']}, errors: {o['error']} |")
print(f"| RSS idle / full / end of hold / after close | {r['rss_before_kb']//1024} / {r['rss_full_kb']//1024} / {r['rss_end_of_hold_kb']//1024} / {r['rss_after_close_kb']//1024} MiB ({r['bytes_per_connection']} bytes per connection) |")
print(f"| fresh client during the hold | greeted in {r['fresh_greeting_ms']} ms; '{r['fresh_reply'][:40]}'; delivered: {d} |")
print(f"| {sum(e.values())} beyond max_connections | 421: {e['421']}, 220: {e['220']}, errors: {e['error']} |")
print(f"| {p['tried']} from one address (per-IP cap 50) | 220: {p['220']}, 421: {p['421']} |")
EOF
  # More rounds of the same flood: does RSS stay at the first round's peak?
  for r in $(seq 2 "${HOLD_ROUNDS:-1}"); do
    log "hold round $r"
    flood hold -n "$N" --hold 10 --excess 0 --per-ip 50 --per-ip-extra 0 --every 3 >"$T/hold-$r.json"
    python3 - "$T/hold-$r.json" "$r" >>"$T/rounds" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| hold round {sys.argv[2]}: {r['open']['220']} connections again | RSS full {r['rss_full_kb']//1024} MiB, after close {r['rss_after_close_kb']//1024} MiB |")
EOF
  done
fi
[ -f "$T/rounds" ] && cat "$T/rounds" >>"$OUT"
if [ "$SLOW" -gt 0 ]; then
  log "slowloris: $SLOW clients in DATA, a byte every 3 s (data_timeout 20 s)"
  flood slowloris -n "$SLOW" --every 3 --max-seconds 90 >"$T/slow.json"
  python3 - "$T/slow.json" >>"$OUT" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
told = ", ".join(f"{v}× '{k}'" for k, v in r["told"].items())
print(f"| {r['clients']} DATA slowloris (a byte per 3 s) | {r['cut']} cut off after {r['life_min_s']}–{r['life_max_s']} s (median {r['life_median_s']}); setup errors {r['setup_errors']}; told: {told} |")
EOF
fi
if [ "$TLS" -gt 0 ]; then
  log "tls-silent: $TLS silent on 465 + $TLS stalled after STARTTLS (handshake_timeout 5 s)"
  flood tls-silent -n "$TLS" --max-seconds 60 >"$T/tls.json"
  sleep 2
  python3 - "$T/tls.json" "$(delivered fresh-tls)" >>"$OUT" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); d = sys.argv[2]
for k, label in (("implicit", "silent on 465"), ("starttls", "stalled after STARTTLS")):
    v = r[k]
    print(f"| {v['held']} {label} | {v['dropped']} dropped, after {v['life_median_s']} s median, {v['life_max_s']} s max |")
print(f"| fresh client on the relay port meanwhile | greeted in {r['fresh_greeting_ms']} ms; '{r['fresh_reply'][:40]}'; delivered: {d} |")
EOF
fi
if [ "$SENDERS" -gt 0 ]; then
  # a fresh process, so RSS per key is not hidden by memory the floods left behind
  kill -TERM "$PID"; for _ in $(seq 200); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  for _ in $(seq 100); do ss -ltn "sport = :$RELAY" | grep -q LISTEN || break; sleep 0.1; done
  start_postern
  log "senders: $SENDERS distinct MAIL FROM (postern restarted: pid $PID)"
  flood senders -n "$SENDERS" --sessions 4 >"$T/senders.json"
  log "waiting 75 s for the limiter's housekeeping"
  sleep 75
  python3 - "$T/senders.json" "$(awk '/VmRSS/ {print $2}' /proc/$PID/status)" "$(sed 's/\x1b\[[0-9;]*m//g' "$T/postern.log" | grep -o 'keys=[0-9]*' | tail -1)" >>"$OUT" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); later = int(sys.argv[2]); keys = sys.argv[3] or "keys=?"
a = ", ".join(f"{k}: {v}" for k, v in sorted(r["answers"].items()))
print(f"| {r['senders']} distinct senders through the limiter | {r['per_second']}/s; answers {a}; RSS {r['rss_before_kb']//1024} → {r['rss_after_kb']//1024} MiB ({r['bytes_per_key']} bytes per key) |")
print(f"| the same, after housekeeping | RSS {later//1024} MiB; limiter {keys} |")
EOF
fi
echo
echo "connections.sh $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, postern $("$T/postern" --version 2>/dev/null | head -1)"
echo
row "probe" "outcome"
row "---" "---"
cat "$OUT"
