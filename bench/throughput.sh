#!/usr/bin/env bash
# throughput.sh — Postern end to end (issue #2), beside Postfix and Haraka, in one run.
#
#   smtp-source (SESSIONS parallel, a NEW connection per message) --> postern relay 127.0.0.1:RELAY_PORT
#     --> [delivery] route smtp://127.0.0.1:2526 --> smtp-sink -c (counts what arrived)
#   + final-dot -> "250" latency, two independent ways (LATENCY=both|pcap|probe):
#     pcap:  tcpdump on lo captures the relay port; pcap_latency.py measures EVERY message
#            (server's reply segment - client's last data segment, kernel timestamps)
#     probe: smtp_probe.py, PROBES extra Python sessions alongside, timed from the client side
#
# Phase 1 (this script): postern alone: msgs/s end to end, final-dot->250 p50/p99 (capture and probe).
# Phase 2 (/work/shared/bench/peers.sh, PEERS="postfix haraka target"): the same smtp-source load
#   through Postfix, Haraka and the already running postern ("target"), same harness, same sink;
#   ratios postern/postfix and postern/haraka are taken from phase 2 (like against like).
#
# Env knobs: MESSAGES (20000) SESSIONS (20) SIZE (4096 payload bytes) PROBES (1)
#            PEERS ("postfix haraka"; "" skips phase 2) RELAY_PORT (2600) METRICS_PORT (9726)
#            CONCURRENCY (64, postern [delivery] concurrency) CHECKS (true: SPF/DKIM/DMARC on)
#            LATENCY (both: tcpdump capture of every message + Python probe; pcap; probe)
#            DNS (stub: bench/dns_stub.py on 127.0.0.1:DNS_PORT (5355) answers NXDOMAIN at once;
#                 discard: nameservers = ["127.0.0.1:9"], nothing answers, so with CHECKS=true every
#                 message waits postern's [checks] deadline (20 s): use it only with CHECKS=false)
#            CLIENT (trusted: load from [relay] networks, checks skipped; outside: 127.0.0.1 untrusted,
#                    SPF/DKIM/DMARC run, per-IP caps raised)
#            RULES_DIR (repo rules/) POLICIES_DIR (an empty temp dir: no rate limits)
#            LIMITS ("": none; per-sender: one [[limit]] per sender at 100000000/1m, never reached,
#                    so every MAIL is counted and passes; written into the temp policies dir)
#            CLUSTER_REDIS ("": limits in-process; a redis:// URL: [cluster] with this node
#                    counting in that Redis, e.g. one started with redis-server --port 6390 --save '')
#            POSTERN (repo target/release/postern) PEERS_SH (../shared/bench/peers.sh)
#            DEADLINE (600 s per wait) KEEP (0|1: keep the temp dir) SKIP_INSTALL (0|1)
# Everything is on 127.0.0.1. Every process started here is stopped by its PID at exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-4096}
PROBES=${PROBES:-1}
PEERS=${PEERS-"postfix haraka"}
RELAY_PORT=${RELAY_PORT:-2600}
METRICS_PORT=${METRICS_PORT:-9726}
SINK_PORT=2526                       # fixed: peers.sh's smtp-sink listens here too
CONCURRENCY=${CONCURRENCY:-64}
CHECKS=${CHECKS:-true}
DNS=${DNS:-stub}
LATENCY=${LATENCY:-both}
case "$LATENCY" in both|pcap|probe) ;; *) echo "LATENCY must be both, pcap or probe" >&2; exit 2 ;; esac
[ "$LATENCY" = pcap ] && PROBES=0
DNS_PORT=${DNS_PORT:-5355}
RULES_DIR=${RULES_DIR:-$REPO/rules}
POSTERN=${POSTERN:-$REPO/target/release/postern}
PEERS_SH=${PEERS_SH:-$REPO/../shared/bench/peers.sh}
DEADLINE=${DEADLINE:-600}
KEEP=${KEEP:-0}

log() { echo "[throughput] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- install (postfix gives smtp-source/smtp-sink)
INSTALLED_POSTFIX=0
install() {
  command -v python3 >/dev/null || die "python3 is needed for the latency probe"
  if ! command -v smtp-source >/dev/null || ! command -v smtp-sink >/dev/null || ! command -v bc >/dev/null; then
    log "installing postfix (smtp-source, smtp-sink) and bc"
    # the package must not start a system postfix: a policy-rc.d that denies service starts
    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    echo "postfix postfix/mailname string relay.example.test" | debconf-set-selections
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix bc >&2
    INSTALLED_POSTFIX=1
  fi
  if [ "$LATENCY" != probe ] && ! command -v tcpdump >/dev/null; then
    log "installing tcpdump"
    [ "$INSTALLED_POSTFIX" = 1 ] || apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tcpdump >&2
  fi
}
no_system_postfix() {   # the package's own daemon (if anything started it) must not stay on port 25
  if ss -ltn 'sport = :25' | grep -q LISTEN; then
    if [ "$INSTALLED_POSTFIX" = 1 ] && [ -f /var/spool/postfix/pid/master.pid ]; then
      log "stopping the system postfix that the package install started"; postfix stop >&2 || true
    else
      log "WARNING: something listens on port 25 (not started by this script; left alone)"
    fi
  fi
}

# ---------------------------------------------------------------- temp dir, processes, cleanup
T=$(mktemp -d "${TMPDIR:-/tmp}/postern-bench.XXXXXX")
POSTERN_PID="" SINK_PID="" PROBE_PID="" DNS_PID="" CAP_PID=""
stop_pid() { # $1 pid: TERM, wait up to 15 s, then KILL
  local p=$1; [ -n "$p" ] || return 0
  kill -0 "$p" 2>/dev/null || return 0
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
}
cleanup() {
  stop_pid "$CAP_PID"; stop_pid "$PROBE_PID"; stop_pid "$SINK_PID"; stop_pid "$POSTERN_PID"; stop_pid "$DNS_PID"
  no_system_postfix
  if [ "$KEEP" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { for _ in $(seq 200); do ss -ltn "sport = :$1" | grep -q LISTEN && return 0; sleep 0.1; done; return 1; }
port_free() { for _ in $(seq 200); do ss -ltn "sport = :$1" | grep -q LISTEN || return 0; sleep 0.1; done; return 1; }
sink_count() { tail -c 200 "$T/sink.out" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2 || true; }
metric() { # $1 = exact series name with labels, e.g. postern_delivery_attempts_total{result="ok"}
  curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null | awk -v k="$1" '$1==k {print $2}' | head -1
}

# ---------------------------------------------------------------- postern
start_postern() {
  [ -x "$POSTERN" ] || die "no postern binary at $POSTERN (build it: cargo build --release -j1)"
  cp "$POSTERN" "$T/postern"         # a private copy: a rebuild during the run cannot swap it out
  mkdir -p "$T/data" "$T/policies"
  local pol=${POLICIES_DIR:-$T/policies} ns cluster=""
  case "${LIMITS:-}" in
    "") ;;
    per-sender) printf '[[limit]]\nname = "per-sender"\nkey = "sender"\nrate = "100000000/1m"\n' >"$T/policies/ratelimits.toml" ;;
    *) die "LIMITS must be empty or per-sender" ;;
  esac
  [ -n "${CLUSTER_REDIS:-}" ] && cluster=$'[cluster]\nnode = "bench"\nredis = "'"$CLUSTER_REDIS"$'"\non_backend_error = "tempfail"'
  [ -z "${CLUSTER_REDIS:-}" ] || [ -n "${LIMITS:-}" ] || log "CLUSTER_REDIS without LIMITS: no limit, so no Redis call"
  case "$DNS" in
    stub)
      port_free "$DNS_PORT" || die "port $DNS_PORT is busy (set DNS_PORT)"
      python3 "$HERE/dns_stub.py" --port "$DNS_PORT" 2>"$T/dns.log" &
      DNS_PID=$!
      ns="127.0.0.1:$DNS_PORT" ;;
    discard) ns="127.0.0.1:9" ;;
    *) die "DNS must be stub or discard" ;;
  esac
  case "${CLIENT:-trusted}" in
    # trusted: the load comes from [relay] networks, so SPF/DKIM/DMARC are skipped.
    trusted) networks='"127.0.0.0/8"'; per_ip="" ;;
    # outside: 127.0.0.1 is not trusted, so the checks run as for any MX client; the
    # per-IP caps are raised because all the load comes from one address.
    outside) networks='"192.0.2.0/24"'
             per_ip=$'max_connections_per_ip = 1000\nconnection_rate_per_ip = "1000000/1m"' ;;
    *) die "CLIENT must be trusted or outside" ;;
  esac
  cat >"$T/postern.toml" <<EOF
# written by bench/throughput.sh
[server]
hostname = "postern.bench.test"
data_dir = "$T/data"

[smtp]
relay       = ["127.0.0.1:$RELAY_PORT"]
submission  = []
submissions = []
max_connections = 10000
$per_ip

[relay]
domains  = ["example.net"]          # the recipients' domain (smtp-source -t rcpt@example.net)
networks = [$networks]               # CLIENT=${CLIENT:-trusted}

[delivery]
route    = "smtp://127.0.0.1:$SINK_PORT"
outbound = "smtp://127.0.0.1:$SINK_PORT"
concurrency = $CONCURRENCY
retry = ["1s", "2s", "5s"]
max_age = "10m"

[dns]
nameservers = ["$ns"]               # loopback only: DNS=$DNS

[checks]
spf = $CHECKS
dkim = $CHECKS
dmarc = $CHECKS

[rules]
dir = "$RULES_DIR"

[policies]
dir = "$pol"

[quarantine]
pop3 = []
pop3s = []
imap = []
imaps = []

[metrics]
listen = "127.0.0.1:$METRICS_PORT"

$cluster
EOF
  port_free "$RELAY_PORT" || die "port $RELAY_PORT is busy (set RELAY_PORT)"
  port_free "$METRICS_PORT" || die "port $METRICS_PORT is busy (set METRICS_PORT)"
  RUST_LOG=${RUST_LOG:-warn} "$T/postern" serve --config "$T/postern.toml" >"$T/postern.log" 2>&1 &
  POSTERN_PID=$!
  wait_port "$RELAY_PORT" && wait_port "$METRICS_PORT" || { tail -20 "$T/postern.log" >&2; die "postern did not start"; }
  log "postern pid $POSTERN_PID on 127.0.0.1:$RELAY_PORT, metrics 127.0.0.1:$METRICS_PORT, data $T/data"
}

# ---------------------------------------------------------------- phase 1: postern + latency probe
phase1() {
  port_free $SINK_PORT || die "port $SINK_PORT is busy (peers.sh and this script need it for smtp-sink)"
  : >"$T/sink.out"
  smtp-sink -u nobody -c 127.0.0.1:$SINK_PORT 1024 >"$T/sink.out" 2>&1 &
  SINK_PID=$!
  wait_port $SINK_PORT || die "smtp-sink did not start"

  local s i e got want n=0 probe_n
  rm -f "$T/stop"
  P1_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
  log "phase 1: MESSAGES=$MESSAGES SESSIONS=$SESSIONS SIZE=$SIZE PROBES=$PROBES (loadavg $P1_LOAD)"
  rm -f "$T/ready"
  if [ "$LATENCY" != probe ]; then
    # headers + first payload bytes are enough; -B: a 64 MiB kernel buffer so nothing is dropped;
    # (no --immediate-mode: it costs postern a third of its throughput on 2 cores; instead the capture
    #  runs 1.5 s past the last message, so tcpdump's 1 s ring-block timeout hands over every packet)
    tcpdump -i lo -n -s 96 -B 65536 -w "$T/relay.pcap" "tcp port $RELAY_PORT" 2>"$T/tcpdump.log" &
    CAP_PID=$!
    for _ in $(seq 100); do grep -q "listening on" "$T/tcpdump.log" 2>/dev/null && break; sleep 0.1; done
    sleep 0.5   # a moment for the capture to be under way before the first connection
  fi
  if [ "$PROBES" -gt 0 ]; then
    python3 "$HERE/smtp_probe.py" --port "$RELAY_PORT" --probes "$PROBES" --size "$SIZE" \
        --stop "$T/stop" --ready "$T/ready" --max-seconds "$DEADLINE" >"$T/probe.json" &
    PROBE_PID=$!
    for _ in $(seq 100); do [ -e "$T/ready" ] && break; sleep 0.1; done
  fi
  s=$(date +%s.%N)
  timeout "$DEADLINE" smtp-source -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" \
      -f sender@example.test -t rcpt@example.net -M client.example.test 127.0.0.1:$RELAY_PORT \
      || die "smtp-source failed (exit $?); postern log: $(tail -5 "$T/postern.log")"
  i=$(date +%s.%N)
  touch "$T/stop"
  if [ -n "$PROBE_PID" ]; then wait "$PROBE_PID" || log "probe exited non-zero"; PROBE_PID=""; fi
  probe_n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["messages"])' "$T/probe.json" 2>/dev/null || echo 0)
  want=$((MESSAGES + probe_n))
  while :; do
    got=$(sink_count); got=${got:-0}
    [ "$got" -ge "$want" ] && break
    n=$((n+1)); [ $n -gt $((DEADLINE*10)) ] && { log "timeout: only $got/$want delivered"; break; }
    sleep 0.05
  done
  e=$(date +%s.%N)
  if [ -n "$CAP_PID" ]; then
    sleep 1.5; kill -INT "$CAP_PID" 2>/dev/null || true; wait "$CAP_PID" 2>/dev/null || true; CAP_PID=""
    P1_CAPDROP=$(grep -o '[0-9]* packets dropped by kernel' "$T/tcpdump.log" || echo "? packets dropped by kernel")
    python3 "$HERE/pcap_latency.py" "$T/relay.pcap" "$RELAY_PORT" >"$T/pcap.json" || log "pcap_latency.py found no messages"
  fi

  P1_INJECT=$(echo "scale=1; $MESSAGES/($i-$s)" | bc)
  P1_RATE=$(echo "scale=1; $MESSAGES/($e-$s)" | bc)          # smtp-source's messages only
  P1_RATE_ALL=$(echo "scale=1; $got/($e-$s)" | bc)            # everything the sink counted (incl. probe)
  P1_SECS=$(echo "scale=2; ($e-$s)/1" | bc)
  P1_GOT=$got; P1_WANT=$want
  P1_OK=$(metric 'postern_delivery_attempts_total{result="ok"}')
  P1_RECV=$(metric 'postern_messages_received_total{listener="relay"}')
  P1_TEMP=$(metric 'postern_delivery_attempts_total{result="tempfail"}')
  P1_AUTH=$(metric_sum postern_auth_results_total)
  stop_pid "$SINK_PID"; SINK_PID=""
  port_free $SINK_PORT || die "smtp-sink did not release port $SINK_PORT"
}

metric_sum() { # $1 = metric name: sum over all its series
  curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null | awk -v k="$1" 'index($1, k"{")==1 || $1==k {s+=$2} END {print s+0}'
}
jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); exec("v="+sys.argv[2]); print(v)' "$1" "$2" 2>/dev/null || echo "n/a"; }
pyget() { jget "$T/probe.json" "$1"; }
pcget() { jget "$T/pcap.json" "$1"; }

# ---------------------------------------------------------------- main
[ "${SKIP_INSTALL:-0}" = 1 ] || install
no_system_postfix
start_postern
phase1

echo "== postern end to end (phase 1: smtp-source -> postern -> smtp-sink, new connection per message) =="
echo "binary:              $POSTERN (built $(date -u -r "$POSTERN" +%FT%TZ), sha256 $(sha256sum "$T/postern" | cut -c1-12)), repo HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted src changes')"
echo "config:              limits=${LIMITS:-none} cluster_redis=${CLUSTER_REDIS:-none}, checks spf/dkim/dmarc=$CHECKS, dns=$DNS, delivery concurrency=$CONCURRENCY, rules=$RULES_DIR ($(ls "$RULES_DIR"/*.rhai 2>/dev/null | wc -l) scripts), durability on (250 after the store's group-commit flush)"
echo "load:                loadavg at start of phase 1: $P1_LOAD (2 cores)"
echo "messages:            $MESSAGES x ${SIZE} B payload, $SESSIONS smtp-source sessions (+$PROBES probe sessions)"
echo "end-to-end:          $P1_RATE msgs/s  ($MESSAGES smtp-source messages, start -> sink counted all $P1_WANT in ${P1_SECS} s; $P1_RATE_ALL msgs/s counting the probe's too)"
echo "injection only:      $P1_INJECT msgs/s  (smtp-source start -> exit)"
echo "sink counted:        $P1_GOT / $P1_WANT   postern metrics: received(relay)=${P1_RECV:-?} delivery ok=${P1_OK:-?} tempfail=${P1_TEMP:-?} auth results=${P1_AUTH:-?}"
if [ "$LATENCY" != probe ]; then
  echo "final dot -> reply, every message (tcpdump): p50 $(pcget 'd["dot_to_reply_ms"]["p50"]') ms, p90 $(pcget 'd["dot_to_reply_ms"]["p90"]') ms, p99 $(pcget 'd["dot_to_reply_ms"]["p99"]') ms, p99.9 $(pcget 'd["dot_to_reply_ms"]["p999"]') ms, max $(pcget 'd["dot_to_reply_ms"]["max"]') ms"
  echo "   measured $(pcget 'd["messages"]') of the $P1_WANT messages sent, replies $(pcget 'd["replies"]'), $P1_CAPDROP"
  echo "   (method: tcpdump -i lo on the relay port; per connection, kernel timestamp of postern's reply segment minus that of the client's last DATA segment, the one with the final dot; server-side time, no client delay)"
fi
if [ "$PROBES" -gt 0 ]; then
  echo "final dot -> 250, probe: p50 $(pyget 'd["dot_to_250_ms"]["p50"]') ms, p90 $(pyget 'd["dot_to_250_ms"]["p90"]') ms, p99 $(pyget 'd["dot_to_250_ms"]["p99"]') ms, max $(pyget 'd["dot_to_250_ms"]["max"]') ms  over $(pyget 'd["messages"]') probe messages ($(pyget 'd["errors"]') errors)"
  echo "MAIL FROM -> 250, probe: p50 $(pyget 'd["mail_to_250_ms"]["p50"]') ms, p90 $(pyget 'd["mail_to_250_ms"]["p90"]') ms, p99 $(pyget 'd["mail_to_250_ms"]["p99"]') ms, max $(pyget 'd["mail_to_250_ms"]["max"]') ms  (where the rate limits are checked)"
  echo "   (method: $PROBES Python probe sessions running alongside smtp-source, same size, a new connection per message; t0 = sendall of the final CRLF.CRLF returned, t1 = the reply line read)"
fi

if [ -n "$PEERS" ]; then
  [ -f "$PEERS_SH" ] || die "no peers.sh at $PEERS_SH"
  log "phase 2: $PEERS_SH with PEERS=\"$PEERS target\" TARGET_PORT=$RELAY_PORT (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
  PEERS="$PEERS target" TARGET_PORT=$RELAY_PORT MSGS=$MESSAGES SESSIONS=$SESSIONS SIZE=$SIZE DEADLINE=$DEADLINE \
    BASE="${PEERS_BASE:-${TMPDIR:-/tmp}/postern-peers}" bash "$PEERS_SH" | tee "$T/peers.out"
  rate_of() { awk -v p="$1" '$1==p {print $2}' "$T/peers.out" | tail -1; }
  PF=$(rate_of postfix); HK=$(rate_of haraka); TG=$(rate_of target)
  ratio() { [ -n "$1" ] && [ -n "$2" ] && [ "$2" != 0 ] && echo "scale=2; $1/$2" | bc || echo "n/a"; }
  echo "== same harness (peers.sh, phase 2) =="
  echo "postern: ${TG:-n/a} msgs/s   postfix: ${PF:-n/a} msgs/s   haraka: ${HK:-n/a} msgs/s"
  echo "ratio postern/postfix: $(ratio "$TG" "$PF")   ratio postern/haraka: $(ratio "$TG" "$HK")"
  echo "(phase 1 postern, with the probe alongside: $P1_RATE msgs/s; loadavg after phase 2: $(cut -d' ' -f1-3 /proc/loadavg))"
fi
