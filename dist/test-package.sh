#!/usr/bin/env bash
# Build the Debian package, install it on this machine, run the installed
# gateway as its unit would (the postern user, CAP_NET_BIND_SERVICE as the
# only capability, no new privileges), send it one message on port 25, see it
# in the Maildir under /var/lib/postern, stop it by PID, remove and purge
# the package, and check what is left. In between, an upgrade (the same
# package as revision 2): the edited config, the queue and the permissions
# must survive it. Run by .ci/run as root; there is no
# systemd in CI, so ExecStart is run directly. Everything goes to loopback
# (the installed config's DNS is pointed at 127.0.0.1:9 for the test).
#
# Usage: bash dist/test-package.sh   (as root; skips when not root)
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s.%N)
fail() { echo "FAIL: $*" >&2; exit 1; }
step() { printf '== [%5.1fs] %s\n' "$(python3 -c "import time; print(time.time() - $t0)")" "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "skip: dist/test-package.sh installs a Debian package and needs root (it runs as root in CI)"
    exit 0
fi
for tool in dpkg dpkg-deb dpkg-statoverride setpriv python3 cargo; do
    command -v "$tool" >/dev/null || fail "$tool is missing"
done

CONF=/etc/postern/postern.toml
DATA=/var/lib/postern
PORTS="25 587 465 110 995 143 993 9725"
LOG=$(mktemp /tmp/postern-pkg-test.XXXXXX.log)
PID=""
INSTALLED=""

# Leave the machine as it was found, whatever happens below.
had_user=$(getent passwd postern >/dev/null && echo yes || echo no)
had_data=$([ -e "$DATA" ] && echo yes || echo no)
cleanup() {
    rc=$?
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        echo "cleanup: stopping postern (pid $PID)"
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID" 2>/dev/null || true
    fi
    if [ -n "$INSTALLED" ] && dpkg-query -W postern >/dev/null 2>&1; then
        echo "cleanup: purging the package"
        dpkg -P postern >/dev/null 2>&1 || true
    fi
    if [ "$had_data" = no ] && [ -e "$DATA" ]; then rm -rf "$DATA"; fi
    if [ "$had_user" = no ] && getent passwd postern >/dev/null; then
        userdel postern >/dev/null 2>&1 || true
        groupdel postern >/dev/null 2>&1 || true
    fi
    if [ "$rc" != 0 ] && [ -s "$LOG" ]; then
        echo "--- gateway log ($LOG)"; tail -n 40 "$LOG"
    fi
    exit "$rc"
}
trap cleanup EXIT

step "standard ports free? ($PORTS)"
busy=""
for p in $PORTS; do
    if ! python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', int(sys.argv[1])))" "$p" 2>/dev/null; then
        owner=$(command -v ss >/dev/null && ss -Hltnp "sport = :$p" 2>/dev/null | sed 's/.*users:/users:/' | head -n1)
        busy="$busy port $p (${owner:-owner unknown: install iproute2 for ss});"
    fi
done
[ -z "$busy" ] || fail "standard ports in use on this machine:$busy stop whatever holds them (this script does not) and run it again"
echo "all free"

step "postern not installed already?"
if dpkg-query -W -f='${Status}' postern 2>/dev/null | grep -q 'install ok'; then
    fail "a postern package is installed here already (dpkg -s postern); this script installs and removes it, so it refuses to touch that one"
fi
echo "not installed"

step "cargo-deb"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "cargo-deb missing: cargo install cargo-deb --locked"
    cargo install cargo-deb --locked --version '^3.8'
fi
cargo deb --version

step "the release binary (built by cargo test --release / cargo build --release)"
if [ ! -x target/release/postern ]; then
    echo "target/release/postern missing: cargo build --release"
    cargo build --release
fi
ls -l target/release/postern

step "cargo deb --no-build (package the binary above; no rebuild)"
rm -f target/debian/postern_*.deb target/debian/postern-dbgsym_*.ddeb
deb_t0=$(date +%s)
cargo deb --no-build --fast
echo "cargo deb took $(( $(date +%s) - deb_t0 ))s"
DEB=$(ls target/debian/postern_*.deb)
ls -l target/debian/
dpkg-deb -f "$DEB" Package Version Depends
dpkg-deb -c "$DEB" | awk '{print $1, $2, $6}'

step "dpkg -i $DEB"
INSTALLED=yes
dpkg -i "$DEB"
dpkg-query -W -f='${Package} ${Version} ${Status}\n' postern

step "what landed where"
for f in /usr/bin/postern "$CONF" /etc/postern/rules /etc/postern/policies/ratelimits.toml \
         /etc/postern/policies/users.toml "$DATA"; do
    [ -e "$f" ] || fail "$f is missing after install"
    stat -c '%A %U:%G %n' "$f"
done
UNIT=""
for u in /lib/systemd/system/postern.service /usr/lib/systemd/system/postern.service; do
    [ -e "$u" ] && UNIT=$u
done
[ -n "$UNIT" ] || fail "the unit is not in /lib/systemd/system or /usr/lib/systemd/system"
echo "unit: $UNIT"
ls /etc/postern/rules
echo "conffiles:"; dpkg-query -W -f='${Conffiles}\n' postern | awk 'NF {print "  " $1}'
for f in "$CONF" /etc/postern/policies/users.toml /etc/postern/policies/ratelimits.toml \
         /etc/postern/rules/10-auth.rhai; do
    dpkg-query -W -f='${Conffiles}\n' postern | grep -q " $f " || fail "$f is not a conffile"
done
id postern
[ "$(stat -c '%U:%G %a' "$DATA")" = "postern:postern 750" ] || fail "$DATA is $(stat -c '%U:%G %a' "$DATA"), not postern:postern 750"
[ "$(stat -c '%U:%G %a' /etc/postern/policies/users.toml)" = "root:postern 640" ] \
    || fail "users.toml is $(stat -c '%U:%G %a' /etc/postern/policies/users.toml), not root:postern 640"
echo "statoverride: $(dpkg-statoverride --list /etc/postern/policies/users.toml)"
WANTS=/etc/systemd/system/multi-user.target.wants/postern.service
if command -v deb-systemd-helper >/dev/null; then
    [ -L "$WANTS" ] || fail "the unit was not enabled ($WANTS missing)"
    echo "enabled: $WANTS -> $(readlink "$WANTS")"
else
    echo "(no deb-systemd-helper here: enabling skipped by postinst, as on any machine without init-system-helpers)"
fi
if command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze verify $UNIT:"
    systemd-analyze verify "$UNIT" && echo "  clean"
    systemd-analyze security --offline=true "$UNIT" 2>/dev/null | tail -n 1 || true
else
    echo "(no systemd-analyze here: unit not verified)"
fi
if [ -d /run/systemd/system ]; then
    echo "systemd runs here: postinst started the unit; stopping it to run ExecStart by hand as CI does"
    systemctl stop postern || true
fi

# The test's one change to the installed config, as an admin would make:
# DNS (SPF/DKIM/DMARC lookups) to a dead loopback port, so nothing leaves.
sed -i 's/^nameservers = \[\].*/nameservers = ["127.0.0.1:9"]   # dist\/test-package.sh: loopback only/' "$CONF"
grep -n '^nameservers' "$CONF"

step "postern check --config $CONF (as root, then as postern, like ExecStartPre)"
/usr/bin/postern check --config "$CONF"
setpriv --reuid postern --regid postern --init-groups -- /usr/bin/postern check --config "$CONF"

step "postern serve as ExecStart: user postern, ambient CAP_NET_BIND_SERVICE, no new privileges"
(
    cd "$DATA"
    umask 0027
    exec setpriv --reuid postern --regid postern --init-groups \
        --inh-caps -all,+net_bind_service --ambient-caps -all,+net_bind_service \
        --bounding-set -all,+net_bind_service --no-new-privs -- \
        /usr/bin/postern serve --config "$CONF"
) >>"$LOG" 2>&1 &
PID=$!
echo "pid $PID, log $LOG"
python3 - "$PID" <<'EOF'
import socket, sys, time, os
pid = int(sys.argv[1])
t = time.time()
while True:
    try:
        socket.create_connection(("127.0.0.1", 25), timeout=1).close()
        print(f"port 25 answers after {time.time() - t:.2f}s")
        break
    except OSError:
        pass
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("postern exited before listening")
    if time.time() - t > 30:
        sys.exit("port 25 not listening after 30s")
    time.sleep(0.05)
EOF
grep -E '^(Uid|Gid|CapEff|CapPrm|CapAmb|CapBnd|NoNewPrivs)' "/proc/$PID/status"
[ "$(awk '/^Uid/ {print $2}' "/proc/$PID/status")" = "$(id -u postern)" ] || fail "not running as postern"
[ "$(awk '/^NoNewPrivs/ {print $2}' "/proc/$PID/status")" = 1 ] || fail "NoNewPrivs not set"
# CAP_NET_BIND_SERVICE is bit 10: 0x400, and nothing else.
[ "$(awk '/^CapEff/ {print $2}' "/proc/$PID/status")" = 0000000000000400 ] || fail "effective capabilities are not exactly CAP_NET_BIND_SERVICE"
ss -Hltnp 2>/dev/null | grep -F "pid=$PID," | awk '{print "  listening", $4}' || true

step "one message to a relay domain over port 25 (Python smtplib)"
TOKEN="pkgtest-$(date +%s)-$$"
python3 - "$TOKEN" <<'EOF'
import smtplib, sys
from email.message import EmailMessage
token = sys.argv[1]
m = EmailMessage()
m["From"] = "sender@outside.test"
m["To"] = "alice@example.test"
m["Subject"] = f"package test {token}"
m["Message-ID"] = f"<{token}@outside.test>"
m.set_content(f"Sent to the installed package by dist/test-package.sh ({token}).\n")
with smtplib.SMTP("127.0.0.1", 25, timeout=30) as s:
    code, banner = s.ehlo("client.outside.test")
    print("EHLO:", code, banner.decode().splitlines()[0])
    refused = s.send_message(m)
    print("accepted; refused recipients:", refused or "none")
EOF

step "the message in the Maildir under $DATA"
MBOX="$DATA/maildir/alice@example.test/new"
found=""
for _ in $(seq 1 200); do
    found=$(grep -l "$TOKEN" "$MBOX"/* 2>/dev/null | head -n1 || true)
    [ -n "$found" ] && break
    sleep 0.1
done
[ -n "$found" ] || fail "no message with $TOKEN in $MBOX"
stat -c '%A %U:%G %s bytes %n' "$found"
grep -E '^(Received|Authentication-Results|X-Postern-External|Subject):' "$found" | cut -c1-120
[ "$(stat -c %U "$found")" = postern ] || fail "the delivered file is not owned by postern"

step "admin command as postern while serving; metrics on 127.0.0.1:9725"
setpriv --reuid postern --regid postern --init-groups -- /usr/bin/postern queue list --config "$CONF" | head -n 5
python3 - <<'EOF'
import urllib.request
body = urllib.request.urlopen("http://127.0.0.1:9725/metrics", timeout=10).read().decode()
lines = [l for l in body.splitlines() if l.startswith("postern_messages_received_total")]
print("\n".join(lines) or "no postern_messages_received_total")
assert any(l.startswith('postern_messages_received_total{listener="relay"}') and not l.endswith(" 0") for l in lines), "relay counter did not move"
EOF

step "a message that stays queued: relayed from loopback to another domain, whose MX lookup fails (DNS on a dead loopback port)"
python3 - "$TOKEN" <<'PY'
import smtplib, sys
with smtplib.SMTP("127.0.0.1", 25, timeout=30) as s:
    s.ehlo("client.outside.test")
    refused = s.sendmail("sender@outside.test", ["carol@elsewhere.test"],
                         f"Subject: queued {sys.argv[1]}\r\n\r\nstays in the queue\r\n")
    print("accepted; refused recipients:", refused or "none")
PY
queued=""
for _ in $(seq 1 100); do
    queued=$(setpriv --reuid postern --regid postern --init-groups -- /usr/bin/postern queue list --config "$CONF" | grep 'carol@elsewhere.test' || true)
    case "$queued" in *deferred*) break ;; esac
    sleep 0.1
done
echo "$queued"
case "$queued" in *deferred*) ;; *) fail "the relayed message is not deferred in the queue" ;; esac

step "SIGTERM to pid $PID"
kill -TERM "$PID"
stop_t0=$(date +%s.%N)
st=0
wait "$PID" || st=$?
PID=""
python3 -c "import time; print(f'exited with status $st after {time.time() - $stop_t0:.2f}s')"
[ "$st" = 0 ] || fail "postern exited with $st on SIGTERM"
tail -n 3 "$LOG"

step "upgrade: dpkg -i the same package as revision 2 over it; the edited conffile, the queue and the permissions stay"
mkdir -p target/debian/upgrade
rm -f target/debian/upgrade/*.deb
cargo deb --no-build --fast --deb-revision 2 -o target/debian/upgrade/ >/dev/null
dpkg -i target/debian/upgrade/postern_0.1.0-2_amd64.deb
dpkg-query -W -f='${Package} ${Version} ${Status}\n' postern
grep -q '^nameservers = \["127.0.0.1:9"\]' "$CONF" || fail "the upgrade replaced the edited $CONF"
[ "$(stat -c '%U:%G %a' /etc/postern/policies/users.toml)" = "root:postern 640" ] || fail "users.toml lost its permissions"
[ "$(stat -c '%U:%G %a' "$DATA")" = "postern:postern 750" ] || fail "$DATA lost its owner"
after=$(setpriv --reuid postern --regid postern --init-groups -- /usr/bin/postern queue list --config "$CONF" | grep 'carol@elsewhere.test' || true)
echo "$after"
[ -n "$after" ] || fail "the queued message did not survive the upgrade"
echo "edited config kept, queue kept, permissions kept"

step "dpkg -r postern: binary and unit gone, conffiles kept"
dpkg -r postern
[ ! -e /usr/bin/postern ] || fail "/usr/bin/postern still there after dpkg -r"
for u in /lib/systemd/system/postern.service /usr/lib/systemd/system/postern.service; do
    [ ! -e "$u" ] || fail "$u still there after dpkg -r"
done
[ -e "$CONF" ] || fail "$CONF was removed by dpkg -r (conffiles stay until purge)"
dpkg-query -W -f='${Status}\n' postern
echo "binary and unit gone; $CONF kept"

step "dpkg -P postern: conffiles, queue and statoverride gone; delivered mail kept"
dpkg -P postern
INSTALLED=""
[ ! -e "$CONF" ] || fail "$CONF still there after purge"
[ ! -e /etc/postern ] || { echo "left in /etc/postern:"; find /etc/postern; fail "/etc/postern not removed"; }
[ ! -e "$DATA/store" ] || fail "$DATA/store still there after purge"
! dpkg-statoverride --list /etc/postern/policies/users.toml >/dev/null || fail "statoverride left behind"
! ls /etc/systemd/system/*.wants/postern.service >/dev/null 2>&1 || fail "enablement symlinks left behind"
[ -e "$found" ] || fail "purge removed delivered mail ($found)"
echo "purged; kept: $(find "$DATA" -type f | wc -l) delivered file(s) under $DATA/maildir, user $(id -un postern)"

step "done: dist/test-package.sh passed"
