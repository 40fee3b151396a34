#!/usr/bin/env bash
# imap_vs_dovecot.sh — long-session IMAP load, Postern against Dovecot, same messages, one run.
#
# gen_messages.py writes MESSAGES varied messages (plain, alternative, attachments, a forwarded
# message). Postern (common.sh: temp config, loopback ports, the "[hold]" rule) gets them over
# SMTP, all held for one login "bench" (bench@local.test, password "pw"); Dovecot gets the same
# files in a Maildir of user "bench" (passwd-file, plain password "pw"), with its own config,
# base_dir, logs and self-signed certificate in the temp dir, listening on 127.0.0.1 only, run
# in the foreground (-F) and stopped by its PID. Then imap_load.py --long runs CLIENTS clients
# (all on the one login) for DURATION seconds against each, STARTTLS on both (MODE=imaps for
# implicit TLS, or plain: Postern refuses LOGIN without TLS, so only for Dovecot), and prints
# both tables and a summary line with the ratio. Exit 1 on any error on Postern's side.
#
# Env: CLIENTS (10) DURATION (30) MESSAGES (300) MODE (starttls|imaps) PROCS (2 client
#      processes) ORDER ("dovecot postern") JSON_DIR (write <name>.json there) KEEP=1
#      POSTERN (target/release/postern, copied) DOVECOT (/usr/sbin/dovecot)
set -uo pipefail
MB_TAG=imap_vs_dovecot
# shellcheck source=common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
DOVECOT=${DOVECOT:-/usr/sbin/dovecot}
DC_PID=""
mb_pre_cleanup() {
  if [ -n "$DC_PID" ]; then
    kill -TERM "$DC_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$DC_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DC_PID" 2>/dev/null || true
  fi
}
trap mb_cleanup EXIT
trap 'exit 130' INT TERM
CLIENTS=${CLIENTS:-10}
DURATION=${DURATION:-30}
MESSAGES=${MESSAGES:-300}
MODE=${MODE:-starttls}
PROCS=${PROCS:-2}
ORDER=${ORDER:-"dovecot postern"}
JSON_DIR=${JSON_DIR:-}
[ -x "$DOVECOT" ] || mb_install_pkg dovecot-imapd || mb_die "no dovecot (dovecot-imapd)"
command -v openssl >/dev/null || mb_die "openssl is needed for Dovecot's certificate"

mb_start "bench:bench@local.test:user" pw
MSGS=$MB_DIR/msgs
python3 "$MB_HERE/gen_messages.py" "$MSGS" --count "$MESSAGES" --rcpt bench@local.test
t=$(date +%s)
timeout 300 python3 - "$MB_SMTP" "$MSGS" <<'EOF' || mb_die "could not put the messages in quarantine"
import os, smtplib, sys
port, d = int(sys.argv[1]), sys.argv[2]
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.ehlo("c.test")
for name in sorted(os.listdir(d)):
    with open(os.path.join(d, name), "rb") as f:
        s.sendmail("mallory@far.test", ["bench@local.test"], f.read())   # raises unless 250
s.quit()
EOF
for _ in $(seq 100); do
  held=$(mb_qcount "")
  [ "$held" = "$MESSAGES" ] && break
  sleep 0.2
done
[ "$held" = "$MESSAGES" ] || mb_die "quarantine list shows $held held, expected $MESSAGES"
mb_log "$held messages held in $(( $(date +%s) - t )) s"

# Dovecot: everything under $DC, mail owned by an unprivileged uid when run as root.
DC=$MB_DIR/dovecot
mkdir -p "$DC/run" "$DC/home/bench/Maildir/"{cur,new,tmp}
read -r DC_IMAP DC_IMAPS <<<"$(mb_free_ports 2)"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=gw.test" \
  -keyout "$DC/key.pem" -out "$DC/cert.pem" 2>/dev/null || mb_die "openssl req failed"
i=0
for f in "$MSGS"/*.eml; do
  i=$((i + 1))
  cp "$f" "$DC/home/bench/Maildir/cur/$((1700000000 + i)).M${i}P1.bench,S=$(stat -c %s "$f"):2,"
done
if [ "$(id -u)" = 0 ]; then
  MUID=$(id -u nobody) MGID=$(id -g nobody)
  LOGIN_USER=$(getent passwd dovenull >/dev/null && echo dovenull || echo nobody)
  INTERNAL_USER=$(getent passwd dovecot >/dev/null && echo dovecot || echo nobody)
  chown -R "$MUID:$MGID" "$DC/home"
  chmod 755 "$MB_DIR" "$DC"
else
  MUID=$(id -u) MGID=$(id -g) LOGIN_USER=$(id -un) INTERNAL_USER=$(id -un)
fi
echo "bench:{PLAIN}pw:$MUID:$MGID::$DC/home/bench" >"$DC/passwd"
cat >"$DC/dovecot.conf" <<EOF
base_dir = $DC/run
state_dir = $DC/run
log_path = $DC/dovecot.log
instance_name = bench-$$
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <$DC/cert.pem
ssl_key = <$DC/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain
default_login_user = $LOGIN_USER
default_internal_user = $INTERNAL_USER
first_valid_uid = $MUID
last_valid_uid = $MUID
mail_location = maildir:~/Maildir
passdb {
  driver = passwd-file
  args = scheme=PLAIN $DC/passwd
}
userdb {
  driver = passwd-file
  args = $DC/passwd
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $DC_IMAP
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $DC_IMAPS
  }
}
service anvil {
  chroot =
}
service stats {
  unix_listener stats-reader {
    mode = 0600
  }
  unix_listener stats-writer {
    mode = 0660
  }
}
EOF
"$DOVECOT" -c "$DC/dovecot.conf" -F >"$DC/stdout.log" 2>&1 &
DC_PID=$!
MB_PIDS+=("$DC_PID")
for i in $(seq 100); do
  kill -0 "$DC_PID" 2>/dev/null || { cat "$DC/stdout.log" "$DC/dovecot.log" >&2; mb_die "dovecot exited"; }
  python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" "$DC_IMAP" 2>/dev/null && break
  sleep 0.1
done
mb_log "dovecot pid $DC_PID in $DC: imap $DC_IMAP imaps $DC_IMAPS"

echo "bench pw" >"$MB_DIR/users.txt"
declare -A CPS ERRS
rc=0
for who in $ORDER; do
  case "$who" in
    postern) port=$MB_IMAP; [ "$MODE" = imaps ] && port=$MB_IMAPS ;;
    dovecot) port=$DC_IMAP; [ "$MODE" = imaps ] && port=$DC_IMAPS ;;
    *) mb_die "ORDER: unknown server $who" ;;
  esac
  # warm-up: indexes (Dovecot), caches (Postern) are built by a first session, not timed
  python3 "$MB_HERE/imap_load.py" --long --port "$port" --mode "$MODE" --users "$MB_DIR/users.txt" \
    --clients 1 --duration 2 --label "$who warm-up" >/dev/null 2>&1 || true
  json=$MB_DIR/$who.json
  python3 "$MB_HERE/imap_load.py" --long --port "$port" --mode "$MODE" --users "$MB_DIR/users.txt" \
    --clients "$CLIENTS" --duration "$DURATION" --procs "$PROCS" --label "$who" --json "$json"
  r=$?
  [ "$who" = postern ] && [ "$r" != 0 ] && rc=1
  CPS[$who]=$(python3 -c "import json,sys; print('%.1f' % json.load(open(sys.argv[1]))['commands_per_s'])" "$json")
  ERRS[$who]=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['errors'])" "$json")
  [ -n "$JSON_DIR" ] && cp "$json" "$JSON_DIR/"
  echo
done
kill -0 "$MB_POSTERN_PID" 2>/dev/null || { echo "postern DIED during the run"; rc=1; }
printf '%-8s %12s %8s\n' server commands/s errors
for who in $ORDER; do printf '%-8s %12s %8s\n' "$who" "${CPS[$who]}" "${ERRS[$who]}"; done
if [ -n "${CPS[postern]:-}" ] && [ -n "${CPS[dovecot]:-}" ]; then
  echo "postern/dovecot: $(python3 -c "import sys; print('%.2f' % (float(sys.argv[1]) / float(sys.argv[2])))" "${CPS[postern]}" "${CPS[dovecot]}")"
fi
n=$(grep -ciE 'panic|ERROR' "$MB_LOG" || true)
echo "postern log: $n ERROR/panic lines; dovecot log: $(grep -ciE 'error|fatal|panic' "$DC/dovecot.log" || true) error lines"
exit "$rc"
