# common.sh — sourced by clients.sh and imap_load.sh: a real `postern serve` on a
# temp config (temp data_dir, free loopback ports, no relay networks, checks off,
# a rule that quarantines "[hold]" subjects, users with argon2 hashes from
# `postern passwd`), mail put in quarantine over SMTP, and cleanup by PID.
#
# The caller sets (before sourcing or before mb_start):
#   MB_TAG   a short name for log lines ("clients", "imap_load")
#   POSTERN  the binary (default: <repo>/target/release/postern); it is copied into
#            the temp dir so that a rebuild during the run does not swap it.
#   KEEP=1   keep the temp dir at exit (its path is printed)
# Functions: mb_install_pkg PKG..., mb_start USERS_SPEC, mb_hold ..., mb_stop, mb_cleanup.
# Everything listens on 127.0.0.1. Only processes started here are stopped, by PID.

MB_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MB_REPO=$(cd "$MB_HERE/../.." && pwd)
MB_TAG=${MB_TAG:-mailbox}
POSTERN=${POSTERN:-$MB_REPO/target/release/postern}
KEEP=${KEEP:-0}
MB_PIDS=()          # every background process this script started
MB_POSTERN_PID=""
MB_DIR=""
MB_APT_UPDATED=0

mb_log() { echo "[$MB_TAG] $*" >&2; }
mb_die() { mb_log "ERROR: $*"; exit 1; }

mb_cleanup() {
  local rc=$?
  local p
  if declare -F mb_pre_cleanup >/dev/null; then mb_pre_cleanup || true; fi
  for p in "${MB_PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  # postern has a graceful shutdown (shutdown_grace 3s); give it 6s, then KILL
  for _ in $(seq 60); do
    local alive=0
    for p in "${MB_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${MB_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  if [ -n "$MB_DIR" ] && [ -d "$MB_DIR" ]; then
    if [ "$KEEP" = 1 ]; then mb_log "kept $MB_DIR"; else rm -rf "$MB_DIR"; fi
  fi
  exit "$rc"
}

# mb_install_pkg PKG... : apt-get install what is missing; returns 1 if it cannot.
mb_install_pkg() {
  local missing=() p
  for p in "$@"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *"install ok installed"* ]] || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    mb_log "cannot install ${missing[*]}: need root and apt-get"
    return 1
  fi
  if [ "$MB_APT_UPDATED" = 0 ]; then
    timeout 120 env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    MB_APT_UPDATED=1
  fi
  mb_log "installing ${missing[*]}"
  # no daemon may start from a package install
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  local ok=0
  timeout 300 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || ok=1
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return $ok
}

# Free loopback ports, N of them, held open together so they differ.
mb_free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# mb_start "login:addr1,addr2:role ..." [password]
# All users get the same password (default "pw"), hashed by `postern passwd`.
mb_start() {
  local users_spec=$1 password=${2:-pw}
  [ -x "$POSTERN" ] || mb_die "no $POSTERN: build it with 'cargo build --release -j1'"
  command -v python3 >/dev/null || mb_die "python3 is needed"
  MB_DIR=$(mktemp -d "/tmp/postern-$MB_TAG.XXXXXX")
  cp "$POSTERN" "$MB_DIR/postern"
  MB_BIN=$MB_DIR/postern
  read -r MB_SMTP MB_SUB MB_SUBS MB_POP3 MB_POP3S MB_IMAP MB_IMAPS MB_METRICS <<<"$(mb_free_ports 8)"
  mkdir -p "$MB_DIR/rules" "$MB_DIR/policies" "$MB_DIR/data"
  cat >"$MB_DIR/rules/50-hold.rhai" <<'EOF'
// Hold anything whose subject says so.
fn data(m) { if m.subject.contains("[hold]") { return quarantine("test"); } }
EOF
  : >"$MB_DIR/policies/ratelimits.toml"
  local hash
  hash=$(echo "$password" | "$MB_BIN" passwd) || mb_die "postern passwd failed"
  case "$hash" in '$argon2id$'*) ;; *) mb_die "postern passwd printed '$hash'" ;; esac
  local u login addrs role
  : >"$MB_DIR/policies/users.toml"
  for u in $users_spec; do
    IFS=: read -r login addrs role <<<"$u"
    local list=""
    if [ -n "$addrs" ]; then list="\"${addrs//,/\", \"}\""; fi
    printf '[[user]]\nlogin = "%s"\npassword = "%s"\naddresses = [%s]\nrole = "%s"\n\n' \
      "$login" "$hash" "$list" "${role:-user}" >>"$MB_DIR/policies/users.toml"
  done
  MB_CONFIG=$MB_DIR/postern.toml
  cat >"$MB_CONFIG" <<EOF
[server]
hostname = "gw.test"
data_dir = "data"
shutdown_grace = "3s"

[smtp]
relay = ["127.0.0.1:$MB_SMTP"]
submission = ["127.0.0.1:$MB_SUB"]
submissions = ["127.0.0.1:$MB_SUBS"]
max_message_size = "1MB"
max_recipients = 50
max_connections = 1000
idle_timeout = "30s"

[relay]
domains = ["local.test"]
networks = []

[delivery]
route = "maildir:data/maildir"
outbound = "smtp://127.0.0.1:9"
concurrency = 8
retry = ["1s"]
max_age = "1h"

[dns]
nameservers = ["127.0.0.1:9"]

[checks]
spf = false
dkim = false
dmarc = false

[rules]
dir = "rules"
max_operations = 100000
on_error = "tempfail"
quarantine_score = 10

[policies]
dir = "policies"

[quarantine]
pop3 = ["127.0.0.1:$MB_POP3"]
pop3s = ["127.0.0.1:$MB_POP3S"]
imap = ["127.0.0.1:$MB_IMAP"]
imaps = ["127.0.0.1:$MB_IMAPS"]
retention = "30d"

[metrics]
listen = "127.0.0.1:$MB_METRICS"
EOF
  "$MB_BIN" check --config "$MB_CONFIG" >&2 || mb_die "postern check failed on $MB_CONFIG"
  MB_LOG=$MB_DIR/postern.log
  POSTERN_LOG=${POSTERN_LOG:-info} "$MB_BIN" serve --config "$MB_CONFIG" >/dev/null 2>"$MB_LOG" &
  MB_POSTERN_PID=$!
  MB_PIDS+=("$MB_POSTERN_PID")
  local i
  for i in $(seq 200); do
    kill -0 "$MB_POSTERN_PID" 2>/dev/null || { cat "$MB_LOG" >&2; mb_die "postern exited early"; }
    if python3 - "$MB_SMTP" "$MB_IMAP" "$MB_POP3" "$MB_IMAPS" "$MB_POP3S" <<'EOF' 2>/dev/null; then break; fi
import socket, sys
for p in sys.argv[1:]:
    socket.create_connection(("127.0.0.1", int(p)), timeout=1).close()
EOF
    sleep 0.1
    [ "$i" = 200 ] && { cat "$MB_LOG" >&2; mb_die "postern did not listen within 20 s"; }
  done
  mb_log "postern pid $MB_POSTERN_PID in $MB_DIR: smtp $MB_SMTP pop3 $MB_POP3 pop3s $MB_POP3S imap $MB_IMAP imaps $MB_IMAPS metrics $MB_METRICS"
}

# mb_hold COUNT RCPT... : COUNT messages over SMTP, round-robin over RCPTs, subjects
# "[hold] <rcpt-local-part> #<n>", one connection. Prints nothing; dies on a non-250.
mb_hold() {
  local count=$1; shift
  timeout 120 python3 - "$MB_SMTP" "$count" "$@" <<'EOF' || mb_die "could not put mail in quarantine"
import smtplib, sys
port, count, rcpts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
s.ehlo("c.test")
for n in range(1, count + 1):
    rcpt = rcpts[(n - 1) % len(rcpts)]
    who = rcpt.split("@")[0]
    subject = f"[hold] {who} #{n}"
    body = (f"From: Mallory <mallory@far.test>\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <hold-{n}-{who}@far.test>\r\nDate: Fri, 27 Nov 2026 03:00:00 +0000\r\n\r\n"
            f"Dear {who},\r\nthis is held message number {n}.\r\n.a line that starts with a dot\r\n"
            + "".join(f"filler line {i:03d} " + "x" * 60 + "\r\n" for i in range(n % 7 * 5)))
    s.sendmail("mallory@far.test", [rcpt], body.encode())   # raises unless 250
s.quit()
EOF
}

# mb_qlist: `postern quarantine list` (administrative command, works while serve runs).
# mb_qcount RCPT : how many held lines name that recipient ("" = all held lines).
mb_qlist() { timeout 30 "$MB_BIN" quarantine list --config "$MB_CONFIG" 2>&1; }
mb_qcount() {
  if [ -z "$1" ]; then mb_qlist | grep -cE '^[0-9A-Fa-f]{8,} ' || true
  else mb_qlist | grep -cF -- "-> $1 " || true; fi
}
