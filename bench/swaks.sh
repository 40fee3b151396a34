#!/usr/bin/env bash
# swaks.sh — Debian's swaks (an independent SMTP client) submits a message to a
# real `postern serve` the way a user's mail client would:
#   587-style port: --tls (STARTTLS) and --auth PLAIN
#   465-style port: --tlsc (TLS at connect) and --auth LOGIN
# It prints what swaks printed (the message data suppressed) and exits 1 unless
# both runs ended with a 250 after the data. The gateway (temp config, loopback
# ports, one user) comes from bench/mailbox/common.sh; swaks is installed with
# apt-get when missing and we are root. Only processes started here are stopped.
#
#   bash bench/swaks.sh            # uses target/release/postern (or $POSTERN)
set -euo pipefail
MB_TAG=swaks
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/mailbox/common.sh"
trap mb_cleanup EXIT

mb_install_pkg swaks libnet-ssleay-perl || mb_die "swaks and its TLS (apt-get install swaks libnet-ssleay-perl)"
command -v swaks >/dev/null || mb_die "swaks is not on PATH"

USER_LOGIN=alice@local.test
PASSWORD=swaks-submission-pw
mb_start "$USER_LOGIN:$USER_LOGIN,sales@local.test:user" "$PASSWORD"

failed=0
# run NAME PORT SWAKS-ARGS...: one submission; its transcript, then the verdict.
run() {
  local name=$1 port=$2
  shift 2
  local out rc=0
  out=$(timeout 60 swaks --server 127.0.0.1 --port "$port" --ehlo client.test \
    --from "$USER_LOGIN" --to bob@local.test \
    --auth-user "$USER_LOGIN" --auth-password "$PASSWORD" \
    --header "Subject: swaks over $name" --suppress-data "$@" 2>&1) || rc=$?
  echo "---- swaks over $name (exit $rc)"
  # Trim: the banner and the EHLO capability lists say nothing new.
  printf '%s\n' "$out" | grep -v -E '^(<-|<~)  250-' | sed -e 's/^/  /'
  # The reply after the final dot is the one that says "queued as".
  if [ "$rc" = 0 ] && printf '%s\n' "$out" | grep -q -E '^<~  250 .*queued as'; then
    echo "---- $name: accepted (250 after the data)"
  else
    echo "---- $name: NOT accepted"
    failed=1
  fi
}

run "587 (STARTTLS, AUTH PLAIN)" "$MB_SUB" --tls --auth PLAIN
run "465 (implicit TLS, AUTH LOGIN)" "$MB_SUBS" --tlsc --auth LOGIN

# Both must have arrived in the Maildir of the local recipient.
delivered=0
for _ in $(seq 100); do
  delivered=$(find "$MB_DIR/data/maildir/bob@local.test/new" -type f 2>/dev/null | wc -l)
  [ "$delivered" -ge 2 ] && break
  sleep 0.1
done
echo "---- delivered to bob@local.test: $delivered message(s)"
[ "$delivered" -ge 2 ] || failed=1
logins=$(curl -s "http://127.0.0.1:$MB_METRICS/metrics" | grep '^postern_mailbox_logins_total{protocol="smtp"' || true)
printf '%s\n' "$logins" | sed -e 's/^/  /'
if [ "$failed" = 0 ]; then echo "swaks: both submissions accepted"; else echo "swaks: FAILED"; fi
exit "$failed"
