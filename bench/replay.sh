#!/usr/bin/env bash
# replay.sh — `postern rules replay` over a generated Maildir (issue 11), and
# what `[rules] keep_recent` costs the gateway.
#
# Phase 1: MESSAGES (100000) varied messages (~1.5 KiB: attachments .exe/.scr,
#   "URGENT wire" subjects, SPF/DMARC results in Authentication-Results) in a
#   Maildir in a temp dir; the repository's rules/ against a candidate with
#   20-attachments.rhai changed (.exe no longer risky, "URGENT wire" held);
#   timed with --threads 1 and with one thread per core; prints messages/s and
#   the report's head and per-script tables.
# Phase 2 (KEEP_PHASE=1): `postern serve` on a temp config with keep_recent
#   "0s" then "1h"; SMTP_MESSAGES (5000) over 4 Python sessions to a Maildir
#   route; prints msgs/s and the sled store's size after each, so the bytes per
#   kept copy and the write cost can be read off.
#
# Env knobs: MESSAGES SMTP_MESSAGES KEEP_PHASE (1) ROUNDS (1: off/on pairs, alternating) POSTERN (target/release/postern)
#            PORT (2650) KEEP (0|1: keep the temp dir)
# Builds release first (cargo build --release) unless POSTERN is set.
# Everything is on 127.0.0.1; each process started here is stopped by its PID.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
MESSAGES=${MESSAGES:-100000}
SMTP_MESSAGES=${SMTP_MESSAGES:-5000}
KEEP_PHASE=${KEEP_PHASE:-1}
ROUNDS=${ROUNDS:-1}
PORT=${PORT:-2650}
if [ -z "${POSTERN:-}" ]; then
    (cd "$REPO" && cargo build --release --quiet)
    POSTERN=$REPO/target/release/postern
fi
WORK=$(mktemp -d /tmp/postern-replay.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
cp "$POSTERN" "$WORK/postern"
P=$WORK/postern

mkdir -p "$WORK/rules" "$WORK/candidate" "$WORK/policies"
: > "$WORK/policies/ratelimits.toml"
cp "$REPO"/rules/*.rhai "$WORK/rules/"
cp "$REPO"/rules/*.rhai "$WORK/candidate/"
python3 - "$WORK/candidate/20-attachments.rhai" <<'EOF'
import sys
p = sys.argv[1]
t = open(p).read().replace('"exe", ', '', 1)
t = t.replace('fn data(m) {', 'fn data(m) {\n    if m.subject.contains("URGENT wire") {\n        return quarantine("wire fraud");\n    }', 1)
open(p, 'w').write(t)
EOF
cat > "$WORK/postern.toml" <<EOF
[server]
hostname = "gw.test"
data_dir = "data"
[rules]
dir = "rules"
[policies]
dir = "policies"
EOF

echo "== generating $MESSAGES messages"
python3 - "$WORK/Maildir" "$MESSAGES" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for d in ("cur", "new", "tmp"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n" * 12
for i in range(n):
    exe, scr, urgent = i % 7 == 0, i % 11 == 0, i % 5 == 0
    if i % 13 == 0:
        ar = "gw.test; spf=pass; dkim=none; dmarc=fail header.from=far.test policy.dmarc=reject"
    elif i % 17 == 0:
        ar = "gw.test; spf=fail; dkim=none; dmarc=none"
    else:
        ar = "gw.test; spf=pass; dkim=pass header.d=far.test; dmarc=pass policy.dmarc=none"
    subject = f"URGENT wire transfer {i}" if urgent else f"Minutes of meeting {i}"
    head = (f"Return-Path: <s{i}@far.test>\r\nDelivered-To: u{i % 50}@local.test\r\n"
            f"Received: from mx{i % 40}.far.test ([192.0.2.{i % 250 + 1}])\r\n\tby gw.test (Postern) with ESMTPS id {i:X};\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
            f"Authentication-Results: {ar}\r\nFrom: Sender <s{i}@far.test>\r\nTo: u{i % 50}@local.test\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{i}@far.test>\r\nMIME-Version: 1.0\r\n")
    names = [f"f{i}.{e}" for on, e in ((exe, "exe"), (scr, "scr")) if on]
    if not names:
        body = "Content-Type: text/plain\r\n\r\nHello.\r\n" + filler
    else:
        body = 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n' + filler
        for nm in names:
            body += f'--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="{nm}"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAA\r\n'
        body += "--b--\r\n"
    sub = "cur" if i % 2 == 0 else "new"
    name = f"1700000000.M{i:06d}P1.bench" + (":2,S" if sub == "cur" else "")
    with open(os.path.join(root, sub, name), "w", newline="") as f:
        f.write(head + body)
EOF
du -sh "$WORK/Maildir" | sed 's/^/corpus: /'
# Warm the page cache, so both runs read from memory alike.
find "$WORK/Maildir" -type f -exec cat {} + > /dev/null

for threads in 1 "$(nproc)"; do
    echo "== replay, --threads $threads"
    start=$(date +%s.%N)
    "$P" rules replay --config "$WORK/postern.toml" --rules "$WORK/candidate" \
        --maildir "$WORK/Maildir" --threads "$threads" > "$WORK/report.$threads"
    end=$(date +%s.%N)
    python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'wall {s:.2f}s, {int(sys.argv[3])/s:.0f} messages/s (whole command)')" "$start" "$end" "$MESSAGES"
done
R=$WORK/report.$(nproc)
head -12 "$R"
sed -n '/^running set:/,$p' "$R"

[ "$KEEP_PHASE" = 1 ] || exit 0

echo "== keep_recent cost: $SMTP_MESSAGES messages over SMTP, 4 sessions"
serve_run() { # $1 = keep_recent
    local d=$WORK/serve-$1
    mkdir -p "$d"
    cp -r "$WORK/rules" "$WORK/policies" "$d/"
    : > "$d/policies/users.toml"
    cat > "$d/postern.toml" <<EOF
[server]
hostname = "gw.test"
data_dir = "data"
[smtp]
relay = ["127.0.0.1:$PORT"]
submission = []
submissions = []
[relay]
domains = ["local.test"]
[delivery]
route = "maildir:data/maildir"
[checks]
spf = false
dkim = false
dmarc = false
[rules]
dir = "rules"
keep_recent = "$1"
[policies]
dir = "policies"
[quarantine]
pop3 = []
pop3s = []
imap = []
imaps = []
[metrics]
listen = "127.0.0.1:$((PORT + 1))"
EOF
    "$P" serve --config "$d/postern.toml" > /dev/null 2> "$d/log" &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',int(sys.argv[1])),1)" "$PORT" 2>/dev/null && break
        sleep 0.1
    done
    python3 - "$PORT" "$SMTP_MESSAGES" "$WORK/Maildir" <<'EOF'
import os, smtplib, sys, threading, time
port, n, md = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
files = sorted(os.path.join(md, "cur", f) for f in os.listdir(os.path.join(md, "cur")))[:n]
msgs = [open(f, "rb").read() for f in files]
def worker(k):
    s = smtplib.SMTP("127.0.0.1", port)
    for m in msgs[k::4]:
        try:
            s.sendmail("s@far.test", ["u@local.test"], m)
        except smtplib.SMTPResponseException:
            pass  # refused by the rules: still decided, still kept
    s.quit()
t = time.time()
ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
[x.start() for x in ts]; [x.join() for x in ts]
s = time.time() - t
print(f"  {len(msgs)} messages ({sum(map(len, msgs)) // len(msgs)} bytes avg) in {s:.2f}s: {len(msgs) / s:.0f} msgs/s")
EOF
    sleep 1
    if [ "$1" != 0s ]; then
        # The copies over the control socket, replayed while serving.
        local t0 t1
        t0=$(date +%s.%N)
        "$P" rules replay --config "$d/postern.toml" --rules "$WORK/candidate" --recent 1h > "$d/recent.report"
        t1=$(date +%s.%N)
        python3 -c "import sys; print(f'  replay --recent 1h while serving: {sys.argv[3]} in {float(sys.argv[2])-float(sys.argv[1]):.2f}s (export + replay)')" "$t0" "$t1" "$(head -1 "$d/recent.report" | cut -d' ' -f2-3)"
    fi
    kill -TERM "$pid"; wait "$pid" || true
    echo "  store after: $(du -sk "$d/data/store" | cut -f1) KiB (keep_recent = $1)"
}
for r in $(seq "$ROUNDS"); do
    # Alternate the order, so a warming machine favours neither.
    if [ $((r % 2)) = 1 ]; then order="0s 1h"; else order="1h 0s"; fi
    for k in $order; do rm -rf "$WORK/serve-$k"; serve_run "$k"; done
done
