#!/usr/bin/env bash
# imap_load.sh — IMAP load on a real `postern serve` quarantine (drives imap_load.py).
#
# Starts postern on a temp config (common.sh: temp data_dir, free loopback ports, no relay
# networks, checks off, a rule quarantining "[hold]" subjects, users.toml with hashes from
# `postern passwd`), holds MESSAGES messages over SMTP round-robin across USERS logins
# (u01..uNN @local.test, password "pw"), then runs imap_load.py: CLIENTS clients for
# DURATION seconds, each looping connect, STARTTLS (MODE=starttls) or IMAPS (MODE=imaps),
# LOGIN, SELECT INBOX, FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE), FETCH <random> BODY[],
# STORE +FLAGS/-FLAGS (\Flagged), NOOP, LOGOUT.
# Prints imap_load.py's table, postern's CPU time and RSS, and log ERROR/panic lines.
# Exit status: imap_load.py's (1 if any protocol error), or 1 if postern died.
#
# Env: CLIENTS (20) DURATION (60) MODE (starttls|imaps) MESSAGES (200) USERS (10)
#      TIMEOUT (15 s per reply) JSON=FILE (also write the figures as JSON)
#      POSTERN (target/release/postern, copied) KEEP=1 (keep the temp dir)
# Everything is on 127.0.0.1; postern is stopped by its PID at exit.
set -uo pipefail
MB_TAG=imap_load
# shellcheck source=common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
trap mb_cleanup EXIT
trap 'exit 130' INT TERM
CLIENTS=${CLIENTS:-20}
DURATION=${DURATION:-60}
MODE=${MODE:-starttls}
MESSAGES=${MESSAGES:-200}
USERS=${USERS:-10}
TIMEOUT=${TIMEOUT:-15}
JSON=${JSON:-}

SPEC="" RCPTS=()
for i in $(seq -w 1 "$USERS"); do
  [ ${#i} -lt 2 ] && i=0$i
  SPEC+="u$i:u$i@local.test:user "
  RCPTS+=("u$i@local.test")
done
mb_start "$SPEC" pw
t=$(date +%s.%N)
mb_hold "$MESSAGES" "${RCPTS[@]}"
held=$(mb_qcount "")
mb_log "$held messages held across $USERS users in $(echo "$(date +%s.%N) - $t" | bc 2>/dev/null || echo '?') s"
[ "$held" = "$MESSAGES" ] || mb_die "quarantine list shows $held held, expected $MESSAGES"
for r in "${RCPTS[@]}"; do echo "${r%@*} pw"; done >"$MB_DIR/users.txt"
port=$MB_IMAP; [ "$MODE" = imaps ] && port=$MB_IMAPS

cpu() { awk '{ print $14 + $15 }' "/proc/$MB_POSTERN_PID/stat"; }   # utime+stime, clock ticks
rss() { awk '/VmRSS/ { print $2 }' "/proc/$MB_POSTERN_PID/status"; }
hz=$(getconf CLK_TCK)
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }     # all cores, ticks
cpu0=$(cpu); rss0=$(rss); busy0=$(busy)
py_args=(--port "$port" --mode "$MODE" --users "$MB_DIR/users.txt" --clients "$CLIENTS" --duration "$DURATION" --timeout "$TIMEOUT")
[ -n "$JSON" ] && py_args+=(--json "$JSON")
# RSS of postern every second during the run (to see growth vs a plateau)
( while kill -0 "$MB_POSTERN_PID" 2>/dev/null; do
    echo "$(date +%s) $(awk '/VmRSS/ { print $2 }' "/proc/$MB_POSTERN_PID/status" 2>/dev/null) $(ls "/proc/$MB_POSTERN_PID/task" 2>/dev/null | wc -l)"
    sleep 1
  done ) >"$MB_DIR/rss.txt" 2>/dev/null &
MB_PIDS+=($!)
timeout $((${DURATION%.*} + 4 * ${TIMEOUT%.*} + 60)) python3 "$MB_HERE/imap_load.py" "${py_args[@]}" | tee "$MB_DIR/load.out"
rc=${PIPESTATUS[0]}
busy1=$(busy)
if kill -0 "$MB_POSTERN_PID" 2>/dev/null; then
  cpu1=$(cpu); rss1=$(rss)
  wall=$(sed -n 's/.*; wall \([0-9.]*\) s$/\1/p' "$MB_DIR/load.out"); wall=${wall:-$DURATION}
  client_cpu=$(sed -n 's/^client CPU: \([0-9.]*\) s.*/\1/p' "$MB_DIR/load.out")
  awk -v b0="$busy0" -v b1="$busy1" -v p0="$cpu0" -v p1="$cpu1" -v c="${client_cpu:-0}" -v hz="$hz" -v d="$wall" -v n="$(nproc)" \
    'BEGIN { m = (b1 - b0) / hz; p = (p1 - p0) / hz; printf "machine: %d cores, %.1f core-s busy over the run: postern %.1f, load client %.1f, OTHER processes %.1f (%.0f%% of the machine)\n", n, m, p, c, m - p - c, 100 * (m - p - c) / (n * d) }'
  echo "postern: CPU $(awk -v a="$cpu0" -v b="$cpu1" -v hz="$hz" -v d="$wall" 'BEGIN { printf "%.1f s over the run (%.0f%% of one core)", (b-a)/hz, 100*(b-a)/hz/d }'); RSS ${rss0} kB before, ${rss1} kB after"
  awk 'NR == 1 { t0 = $1 } { if ($2 > max) max = $2; if ($3 > thr) thr = $3; line[NR] = sprintf("%ds:%dMB", $1 - t0, $2 / 1024) }
       END { printf "postern: RSS max %d MB, threads max %d; RSS every ~%ds:", max / 1024, thr, (NR > 12 ? int(NR / 12) : 1);
             step = (NR > 12 ? int(NR / 12) : 1); for (i = 1; i <= NR; i += step) printf " %s", line[i]; print "" }' "$MB_DIR/rss.txt"
  echo "postern: held after the run: $(mb_qcount "") (before: $held)"
else
  echo "postern DIED during the run; log tail:"; tail -20 "$MB_LOG" | sed 's/\x1b\[[0-9;]*m//g'; rc=1
fi
n=$(grep -ciE 'panic|ERROR' "$MB_LOG" || true)
echo "postern log: $n ERROR/panic lines, $(grep -c 'WARN' "$MB_LOG" || true) WARN lines"
grep -iE 'panic|ERROR' "$MB_LOG" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | sort -rn | head -5
exit "$rc"
