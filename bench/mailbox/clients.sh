#!/usr/bin/env bash
# clients.sh — independent mail clients against a real `postern serve` quarantine.
#
# Starts postern on a temp config (see common.sh: temp data_dir, free loopback ports,
# [relay] networks = [], checks off, a rule quarantining "[hold]" subjects, users.toml
# with hashes from `postern passwd`, delivery to a Maildir), holds 3 messages for each
# of alice, bob, carol, dave and erin over SMTP (python3 smtplib), then runs:
#
#   curl      imap:// (STARTTLS, --ssl-reqd -k): LIST, SELECT + FETCH ENVELOPE, UID 1 header
#             and body; pop3:// (STLS) LIST/RETR; pop3s:// as the admin (sees all 15);
#             and a plain-text login attempt that must be refused (LOGINDISABLED / no USER)
#   fetchmail POP3 + STLS into an mbox via `mda "cat >> file"`:
#             bob with `keep` (cert check off): all arrive, quarantine keeps them, a second
#             poll fetches nothing (UIDL stable); alice with `nokeep`, full certificate check
#             (sslcertck + the server's cert + sslfingerprint): all arrive, quarantine empty
#   mpop      POP3 + STLS (tls_fingerprint), SASL auth, keep off, mda `cat >> file` (dave)
#   neomutt   IMAP + STARTTLS under tmux (send-keys / capture-pane) as carol: the index shows
#             the held subjects, a message opens in the pager, one is flagged (F), one deleted
#             (d, expunged at quit); screen captures are saved; then the flag is checked with
#             curl and the deletion with `postern quarantine list`
#
# Prints PASS/FAIL/SKIP per client with what it saw; exit 1 if any FAIL. A client is
# SKIPped only when its package cannot be installed (apt-get, as root).
# Env: POSTERN (target/release/postern)  KEEP=1 (keep the temp dir)  ARTIFACTS=DIR (copy
#      captures, mboxes and the postern log there)  SKIP_INSTALL=1 (do not apt-get)
# Every process started here (postern, the tmux server) is stopped by its PID at exit.
set -uo pipefail

MB_TAG=clients
# shellcheck source=common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
SKIP_INSTALL=${SKIP_INSTALL:-0}
ARTIFACTS=${ARTIFACTS:-}
TMUX_SOCK="postern-clients-$$"
TMUX_PID=""
T0=$(date +%s)

mb_pre_cleanup() {
  if [ -n "$TMUX_PID" ]; then
    timeout 5 tmux -L "$TMUX_SOCK" kill-server 2>/dev/null || true
    kill -TERM "$TMUX_PID" 2>/dev/null || true
  fi
  if [ -n "$ARTIFACTS" ] && [ -n "$MB_DIR" ] && [ -d "$MB_DIR/out" ]; then
    mkdir -p "$ARTIFACTS" && cp -r "$MB_DIR/out/." "$ARTIFACTS/" && cp "$MB_DIR/postern.log" "$ARTIFACTS/" 2>/dev/null
    mb_log "artifacts in $ARTIFACTS"
  fi
}
trap mb_cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- results
RESULTS=()
FAILED=0
SAW=()                     # evidence lines of the client being checked
CHECK_OK=1
saw() { SAW+=("$*"); }
check() {                  # check "what" CONDITION-COMMAND...
  local what=$1; shift
  if "$@"; then saw "ok   $what"; else saw "FAIL $what"; CHECK_OK=0; fi
}
begin() { SAW=(); CHECK_OK=1; }
finish() {                 # finish NAME
  local verdict=PASS
  [ "$CHECK_OK" = 1 ] || { verdict=FAIL; FAILED=1; }
  RESULTS+=("$verdict $1")
  echo "== $verdict $1"
  local l
  for l in "${SAW[@]}"; do echo "     $l"; done
}
skip() {
  RESULTS+=("SKIP $1 ($2)")
  echo "== SKIP $1: $2"
}
has() { grep -qF -- "$2" "$1"; }               # has FILE TEXT
count_in() { grep -cF -- "$2" "$1" 2>/dev/null || true; }
install() {
  [ "$SKIP_INSTALL" = 1 ] && { local p; for p in "$@"; do [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *"install ok installed"* ]] || return 1; done; return 0; }
  mb_install_pkg "$@"
}

# ---------------------------------------------------------------- the gateway
USERS="alice bob carol dave erin"
SPEC=""
for u in $USERS; do SPEC+="$u:$u@local.test:user "; done
SPEC+="root::admin"
install curl ca-certificates openssl || mb_log "curl/openssl could not be installed"
mb_start "$SPEC" pw
OUT=$MB_DIR/out
mkdir -p "$OUT"
RCPTS=()
for u in $USERS; do RCPTS+=("$u@local.test"); done
mb_hold 15 "${RCPTS[@]}"        # user k (1..5) gets messages k, k+5, k+10
for u in $USERS; do
  n=$(mb_qcount "$u@local.test")
  [ "$n" = 3 ] || mb_die "expected 3 held messages for $u, quarantine list shows $n"
done
mb_log "15 messages held (3 per user); $(($(date +%s) - T0)) s so far"
subjects_of() {            # subjects_of INDEX(1..5) -> the 3 subjects held for that user
  local k=$1 u; u=$(echo $USERS | cut -d' ' -f"$k")
  echo "[hold] $u #$k"; echo "[hold] $u #$((k + 5))"; echo "[hold] $u #$((k + 10))"
}
# The server's certificate, taken over STLS (what a client would pin).
timeout 10 openssl s_client -starttls pop3 -connect "127.0.0.1:$MB_POP3" </dev/null 2>/dev/null \
  | openssl x509 >"$OUT/server.pem" 2>/dev/null || true
[ -s "$OUT/server.pem" ] || cp "$MB_DIR/data/tls/cert.pem" "$OUT/server.pem" 2>/dev/null || true

# ---------------------------------------------------------------- (b) curl
CURL=(timeout 20 curl -sS --max-time 15 --connect-timeout 5)
run_curl() {
  begin
  local d=$OUT/curl; mkdir -p "$d"
  local imap="imap://127.0.0.1:$MB_IMAP" pop="pop3://127.0.0.1:$MB_POP3"
  # plain text first: LOGINDISABLED before STARTTLS, USER refused before STLS
  "${CURL[@]}" -u erin:pw "$imap/" >"$d/imap-plain.out" 2>&1; local rc=$?
  saw "imap:// without TLS -> curl rc=$rc: $(tail -1 "$d/imap-plain.out")"
  check "plain-text IMAP login refused" [ "$rc" != 0 ]
  "${CURL[@]}" -u erin:pw "$pop/" >"$d/pop-plain.out" 2>&1; rc=$?
  saw "pop3:// without TLS -> curl rc=$rc: $(tail -1 "$d/pop-plain.out")"
  check "plain-text POP3 login refused" [ "$rc" != 0 ]

  "${CURL[@]}" -v --ssl-reqd -k -u erin:pw "$imap/" >"$d/list.out" 2>"$d/list.err"; rc=$?
  saw "imap LIST (rc=$rc): $(tr -d '\r' <"$d/list.out" | tr '\n' '|')"
  check "STARTTLS was used" grep -q '^> A[0-9]* STARTTLS' "$d/list.err"
  check "LIST shows INBOX and Release" eval 'has "$d/list.out" "INBOX" && has "$d/list.out" "Release"'

  "${CURL[@]}" --ssl-reqd -k -u erin:pw "$imap/INBOX" -X 'FETCH 1:* (UID FLAGS RFC822.SIZE ENVELOPE)' >"$d/fetch.out" 2>&1; rc=$?
  saw "imap SELECT INBOX + FETCH 1:* ENVELOPE (rc=$rc): $(grep -c FETCH "$d/fetch.out") messages"
  local s
  while read -r s; do check "ENVELOPE has \"$s\"" has "$d/fetch.out" "\"$s\""; done < <(subjects_of 5)

  "${CURL[@]}" --ssl-reqd -k -u erin:pw "$imap/INBOX;UID=1;SECTION=HEADER" >"$d/uid1-header.out" 2>&1; rc=$?
  saw "UID 1 header (rc=$rc): $(grep -E '^(Subject|From|Message-ID):' "$d/uid1-header.out" | tr -d '\r' | tr '\n' '|')"
  check "UID 1 header is erin's first message" has "$d/uid1-header.out" "Subject: [hold] erin #5"
  check "header carries postern's Received:" grep -q '^Received: from c.test' "$d/uid1-header.out"
  "${CURL[@]}" --ssl-reqd -k -u erin:pw "$imap/INBOX;UID=1;SECTION=TEXT" >"$d/uid1-body.out" 2>&1; rc=$?
  saw "UID 1 body (rc=$rc, $(wc -c <"$d/uid1-body.out") bytes): $(head -2 "$d/uid1-body.out" | tr -d '\r' | tr '\n' '|')"
  check "body text" has "$d/uid1-body.out" "this is held message number 5."
  check "body keeps a leading-dot line" grep -q '^\.a line that starts with a dot' "$d/uid1-body.out"

  "${CURL[@]}" --ssl-reqd -k -u erin:pw "$pop/" >"$d/pop-list.out" 2>&1; rc=$?
  saw "pop3 LIST (rc=$rc): $(tr -d '\r' <"$d/pop-list.out" | tr '\n' '|')"
  check "POP3 LIST has 3 messages" [ "$(grep -cE '^[0-9]+ [0-9]+' "$d/pop-list.out")" = 3 ]
  local i size got
  for i in 1 2 3; do
    "${CURL[@]}" --ssl-reqd -k -u erin:pw "$pop/$i" >"$d/pop-retr$i.out" 2>&1; rc=$?
    size=$(awk -v n="$i" '$1 == n { print $2 }' "$d/pop-list.out" | tr -d '\r')
    got=$(wc -c <"$d/pop-retr$i.out")
    saw "pop3 RETR $i (rc=$rc): $got bytes (LIST said $size), $(grep '^Subject:' "$d/pop-retr$i.out" | tr -d '\r')"
    check "RETR $i size matches LIST" [ "$got" = "$size" ]
  done
  while read -r s; do check "RETR shows \"$s\"" grep -qF "Subject: $s" "$d"/pop-retr1.out "$d"/pop-retr2.out "$d"/pop-retr3.out; done < <(subjects_of 5)

  "${CURL[@]}" -k -u root:pw "pop3s://127.0.0.1:$MB_POP3S/" >"$d/pop3s-admin.out" 2>&1; rc=$?
  saw "pop3s LIST as admin root (rc=$rc): $(grep -cE '^[0-9]+ [0-9]+' "$d/pop3s-admin.out") messages"
  check "admin sees all 15 over POP3S" [ "$(grep -cE '^[0-9]+ [0-9]+' "$d/pop3s-admin.out")" = 15 ]
  "${CURL[@]}" -k -u erin:wrong "imaps://127.0.0.1:$MB_IMAPS/" >"$d/badpw.out" 2>&1; rc=$?
  saw "imaps with a wrong password -> curl rc=$rc: $(tail -1 "$d/badpw.out")"
  check "wrong password refused" [ "$rc" = 67 ]
  check "erin's 3 messages still held (reading deletes nothing)" [ "$(mb_qcount erin@local.test)" = 3 ]
  finish "curl (imap:// STARTTLS, pop3:// STLS, imaps/pop3s)"
}
if command -v curl >/dev/null; then run_curl; else skip curl "curl could not be installed"; fi

# ---------------------------------------------------------------- (a) fetchmail
run_fetchmail() {
  begin
  local d=$OUT/fetchmail; mkdir -p "$d"
  local me; me=$(id -un)
  # bob: keep, no certificate check
  cat >"$d/keep.rc" <<EOF
set no bouncemail
poll 127.0.0.1 with proto POP3 port $MB_POP3 uidl timeout 20
  user "bob" there with password "pw" is "$me" here
  sslproto "tls1.2+" no sslcertck
  keep fetchall
  mda "cat >> $d/bob.mbox"
EOF
  chmod 600 "$d/keep.rc"
  FETCHMAILHOME=$d timeout 60 fetchmail -v -f "$d/keep.rc" --nodetach --idfile "$d/bob.ids" >"$d/keep.log" 2>&1; local rc=$?
  saw "bob, keep, sslcertck off: fetchmail rc=$rc; $(grep -E 'messages? for bob' "$d/keep.log" | head -1)"
  check "STLS negotiated" grep -q 'upgrade to TLS succeeded' "$d/keep.log"
  check "fetchmail rc 0" [ "$rc" = 0 ]
  saw "bob.mbox subjects: $(grep '^Subject:' "$d/bob.mbox" 2>/dev/null | tr -d '\r' | tr '\n' '|')"
  local s
  while read -r s; do check "bob.mbox has \"$s\"" has "$d/bob.mbox" "Subject: $s"; done < <(subjects_of 2)
  check "dot-stuffed line came back unstuffed (3x)" [ "$(grep -c '^\.a line that starts' "$d/bob.mbox")" = 3 ]
  local n; n=$(mb_qcount bob@local.test)
  saw "postern quarantine list after keep: $n held for bob"
  check "keep: still 3 held for bob" [ "$n" = 3 ]
  sed 's/keep fetchall/keep/' "$d/keep.rc" >"$d/keep2.rc"; chmod 600 "$d/keep2.rc"     # only unseen (UIDL) now
  FETCHMAILHOME=$d timeout 60 fetchmail -f "$d/keep2.rc" --nodetach --idfile "$d/bob.ids" >"$d/keep2.log" 2>&1; rc=$?
  saw "second poll, same UIDL file, no fetchall: rc=$rc ($(grep -E 'No mail|messages?' "$d/keep2.log" | tail -1))"
  check "second poll: no new mail (rc 1, UIDLs stable)" [ "$rc" = 1 ]
  check "bob.mbox still 3 messages" [ "$(grep -c '^Subject: \[hold\]' "$d/bob.mbox")" = 3 ]

  # alice: nokeep, full certificate check against the server's own certificate
  local fp; fp=$(openssl x509 -in "$OUT/server.pem" -noout -fingerprint -md5 2>/dev/null | cut -d= -f2)
  cat >"$d/nokeep.rc" <<EOF
set no bouncemail
poll localhost with proto POP3 port $MB_POP3 uidl timeout 20
  user "alice" there with password "pw" is "$me" here
  sslproto "tls1.2+" sslcertck sslcertfile "$OUT/server.pem" sslfingerprint "$fp"
  nokeep fetchall
  mda "cat >> $d/alice.mbox"
EOF
  chmod 600 "$d/nokeep.rc"
  FETCHMAILHOME=$d timeout 60 fetchmail -v -f "$d/nokeep.rc" --nodetach --idfile "$d/alice.ids" >"$d/nokeep.log" 2>&1; rc=$?
  saw "alice, nokeep, sslcertck + cert + md5 fingerprint $fp: fetchmail rc=$rc; $(grep -E 'messages? for alice' "$d/nokeep.log" | head -1)"
  check "certificate verified (no insecure warning)" eval '! grep -q "connection is insecure" "$d/nokeep.log"'
  check "fetchmail rc 0" [ "$rc" = 0 ]
  saw "server said: $(grep -E 'POP3< \+OK .*signing off|POP3< \+OK.*delet' "$d/nokeep.log" | tail -1 | sed 's/.*POP3< //')"
  saw "alice.mbox subjects: $(grep '^Subject:' "$d/alice.mbox" 2>/dev/null | tr -d '\r' | tr '\n' '|')"
  while read -r s; do check "alice.mbox has \"$s\"" has "$d/alice.mbox" "Subject: $s"; done < <(subjects_of 1)
  n=$(mb_qcount alice@local.test)
  saw "postern quarantine list after nokeep: $n held for alice, $(mb_qcount "") in all"
  check "nokeep: alice's messages deleted from the quarantine" [ "$n" = 0 ]
  check "others untouched (12 left)" [ "$(mb_qcount "")" = 12 ]
  finish "fetchmail (POP3 + STLS, keep and nokeep, MDA cat >> mbox)"
}
if install fetchmail && command -v fetchmail >/dev/null; then run_fetchmail; else skip fetchmail "package fetchmail could not be installed"; fi

# ---------------------------------------------------------------- (a') mpop
run_mpop() {
  begin
  local d=$OUT/mpop; mkdir -p "$d"
  local fp; fp=$(openssl x509 -in "$OUT/server.pem" -noout -fingerprint -sha256 2>/dev/null | cut -d= -f2)
  cat >"$d/mpoprc" <<EOF
defaults
tls on
tls_starttls on
tls_fingerprint $fp
timeout 20
uidls_file $d/uidls

account dave
host 127.0.0.1
port $MB_POP3
user dave
password pw
auth on
keep off
delivery mda "cat >> $d/dave.mbox"
EOF
  chmod 600 "$d/mpoprc"
  HOME=$d timeout 60 mpop -C "$d/mpoprc" --debug dave >"$d/mpop.log" 2>&1; local rc=$?
  saw "dave, keep off, tls_starttls + sha256 fingerprint: mpop rc=$rc; server: $(grep -E '^<-- \+OK dave has|^<-- \+OK .*signing off' "$d/mpop.log" | sed 's/^<-- //' | tr -d '\r' | tr '\n' '|')"
  saw "auth used: $(grep -E '^--> (AUTH|USER|PASS)' "$d/mpop.log" | head -1 | cut -c1-40)"
  check "mpop rc 0" [ "$rc" = 0 ]
  check "STLS sent" grep -q '^--> STLS' "$d/mpop.log"
  saw "dave.mbox subjects: $(grep '^Subject:' "$d/dave.mbox" 2>/dev/null | tr -d '\r' | tr '\n' '|')"
  local s
  while read -r s; do check "dave.mbox has \"$s\"" has "$d/dave.mbox" "Subject: $s"; done < <(subjects_of 4)
  local n; n=$(mb_qcount dave@local.test)
  saw "postern quarantine list after keep off: $n held for dave"
  check "dave's messages deleted from the quarantine" [ "$n" = 0 ]
  finish "mpop (POP3 + STLS, SASL, keep off, MDA cat >> mbox)"
}
if install mpop && command -v mpop >/dev/null; then run_mpop; else skip mpop "package mpop could not be installed"; fi

# ---------------------------------------------------------------- (c) neomutt under tmux
tm() { timeout 10 tmux -L "$TMUX_SOCK" "$@"; }
cap() { tm capture-pane -p -t nm 2>/dev/null; }
wait_screen() {            # wait_screen SECONDS TEXT : poll the screen until TEXT shows
  local end=$(($(date +%s) + $1))
  while [ "$(date +%s)" -lt "$end" ]; do
    # No pipe into grep -q: under pipefail its early exit makes the writer fail.
    grep -qF -- "$2" <<<"$(cap)" && return 0
    sleep 0.3
  done
  return 1
}
run_neomutt() {
  local mutt=$1
  begin
  local d=$OUT/$mutt; mkdir -p "$d/home"
  cp "$OUT/server.pem" "$d/certs"
  cat >"$d/muttrc" <<EOF
set folder = "imap://carol@127.0.0.1:$MB_IMAP/"
set spoolfile = "+INBOX"
set imap_user = "carol"
set imap_pass = "pw"
set ssl_starttls = yes
set ssl_force_tls = yes
set certificate_file = "$d/certs"
set ssl_verify_host = no
set header_cache = ""
set message_cachedir = ""
set record = ""
set postponed = ""
set move = no
set delete = yes
set resolve = no
set confirmappend = no
set quit = yes
set timeout = 5
set mail_check = 60
set sort = subject
set index_format = "%4C %Z %-15.15L %s"
set help = no
set wait_key = no
set pager_stop = yes
set markers = no
EOF
  rm -f "$d/exit"
  tm -f /dev/null new-session -d -s nm -x 132 -y 40 \
    "HOME=$d/home TERM=xterm-256color timeout --foreground 90 $mutt -n -F $d/muttrc 2>$d/stderr; echo \$? > $d/exit; sleep 30" || true
  TMUX_PID=$(tm display -p '#{pid}' 2>/dev/null || true)
  if ! wait_screen 20 "[Msgs:3"; then
    cap >"$d/screen-failed.txt"
    saw "index never showed 3 messages; screen:"; while read -r l; do saw "  | $l"; done < <(grep -v '^\s*$' "$d/screen-failed.txt")
    check "index opened" false
  else
    sleep 0.5
    cap >"$d/screen-index.txt"
    saw "index screen ($d/screen-index.txt):"
    while read -r l; do saw "  | $l"; done < <(grep -v '^\s*$' "$d/screen-index.txt")
    local s
    while read -r s; do check "index shows \"$s\"" has "$d/screen-index.txt" "$s"; done < <(subjects_of 3)
    check "status line: +INBOX with 3 new" grep -qE 'INBOX \[Msgs:3 New:3' "$d/screen-index.txt"
    # open the first message in the pager
    tm send-keys -t nm = ; sleep 0.3; tm send-keys -t nm Enter
    if wait_screen 15 "this is held message number"; then
      cap >"$d/screen-pager.txt"
      saw "pager screen ($d/screen-pager.txt): $(grep -E '^(Subject|From):' "$d/screen-pager.txt" | tr '\n' '|') $(grep -F 'held message number' "$d/screen-pager.txt")"
      check "pager shows carol's first message (sorted by subject: #13)" has "$d/screen-pager.txt" "Subject: [hold] carol #13"
      check "pager shows the dot line" has "$d/screen-pager.txt" ".a line that starts with a dot"
    else
      cap >"$d/screen-pager.txt"; check "pager opened" false
    fi
    tm send-keys -t nm q; wait_screen 10 "[Msgs:3" || true
    # flag "carol #3", delete "carol #8" (search moves the cursor), then quit (expunge)
    tm send-keys -t nm /; sleep 0.3; tm send-keys -t nm -l '~s "carol #3"'; tm send-keys -t nm Enter; sleep 0.5
    tm send-keys -t nm F; sleep 0.5
    tm send-keys -t nm /; sleep 0.3; tm send-keys -t nm -l '~s "carol #8"'; tm send-keys -t nm Enter; sleep 0.5
    tm send-keys -t nm d; sleep 0.5
    if wait_screen 5 "Del:1"; then :; fi
    cap >"$d/screen-marked.txt"
    saw "after F and d: $(grep -E 'carol #|Msgs:' "$d/screen-marked.txt" | sed 's/-\{3,\}/-/g' | tr -s ' ' | tr '\n' '|')"
    check "index marks one flagged, one deleted" grep -q 'Del:1 Flag:1' "$d/screen-marked.txt"
    tm send-keys -t nm q
  fi
  local i
  for i in $(seq 100); do [ -s "$d/exit" ] && break; sleep 0.2; done
  saw "$mutt exit status: $(cat "$d/exit" 2>/dev/null || echo 'none (still running?)') $(head -c 200 "$d/stderr" 2>/dev/null)"
  check "$mutt quit cleanly" [ "$(cat "$d/exit" 2>/dev/null)" = 0 ]
  tm kill-server 2>/dev/null || true
  [ -n "$TMUX_PID" ] && kill -TERM "$TMUX_PID" 2>/dev/null
  TMUX_PID=""
  # what the server kept: one expunged, the flag stored
  local n; n=$(mb_qcount carol@local.test)
  saw "postern quarantine list after quit: $n held for carol"
  check "the deleted message was expunged from the quarantine" [ "$n" = 2 ]
  "${CURL[@]}" --ssl-reqd -k -u carol:pw "imap://127.0.0.1:$MB_IMAP/INBOX" -X 'FETCH 1:* (FLAGS ENVELOPE)' >"$d/flags.out" 2>&1
  saw "curl FETCH FLAGS afterwards: $(sed -E 's/ENVELOPE \("[^"]*" ("[^"]*").*/\1/' "$d/flags.out" | tr -d '\r' | tr '\n' '|')"
  check "\\Flagged persisted on carol #3" grep -qE 'FLAGS \([^)]*\\Flagged[^)]*\) ENVELOPE \("[^"]*" "\[hold\] carol #3"' "$d/flags.out"
  check "\\Seen persisted on carol #13 (opened)" grep -qE 'FLAGS \([^)]*\\Seen[^)]*\) ENVELOPE \("[^"]*" "\[hold\] carol #13"' "$d/flags.out"
  check "carol #8 is gone" eval '! grep -q "carol #8" "$d/flags.out"'
  finish "$mutt (IMAP + STARTTLS under tmux: index, pager, flag, delete+expunge)"
}
if ! install tmux || ! command -v tmux >/dev/null; then
  skip neomutt "package tmux (needed to drive it) could not be installed"
elif install neomutt && command -v neomutt >/dev/null; then
  run_neomutt neomutt
elif install mutt && command -v mutt >/dev/null; then
  run_neomutt mutt
else
  skip neomutt "neither neomutt nor mutt could be installed"
fi

# ---------------------------------------------------------------- summary
if ! kill -0 "$MB_POSTERN_PID" 2>/dev/null; then
  echo "== FAIL postern died during the run; log tail:"; tail -20 "$MB_LOG"; FAILED=1
fi
panics=$(grep -ciE 'panic|ERROR' "$MB_LOG" || true)
echo
echo "== summary ($(($(date +%s) - T0)) s; postern log: $panics ERROR/panic lines)"
for r in "${RESULTS[@]}"; do echo "   $r"; done
[ "$panics" = 0 ] || { grep -iE 'panic|ERROR' "$MB_LOG" | head -5 | sed 's/\x1b\[[0-9;]*m//g'; }
exit "$FAILED"
