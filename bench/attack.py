#!/usr/bin/env python3
"""attack.py — an attacker's probe list against a Postern it starts (issue 8).

Starts postern on loopback ports with a private data dir, two recording SMTP sinks
(the mailbox backend for example.net, and "the world" for every other domain, as the
outbound smarthost), a loopback DNS stub, and two quarantine users; then runs:

  relay      open-relay tricks (source routes, %-hacks, quoted and bang paths, address
             literals, trailing dots, ...) from an outside address: counted as relayed
             when anything reaches "the world"
  smuggle    SMTP smuggling: every end-of-data look-alike (bare LF/CR, NUL, \\r\\n.\\r ...)
             followed by a second transaction, pipelined and not, plain and after
             STARTTLS: counted as smuggled when the backend receives the inner message
  headers    forged Authentication-Results naming this host (case, trailing dot,
             comments, folding) and an EHLO name that tries to forge a Received date
  isolation  alice over IMAP and POP3 asks for bob's messages (UIDs, sequence numbers,
             odd mailbox names): counted as leaked when bob's subject is shown
  brute      parallel wrong logins over IMAPS, POP3S and SMTP AUTH from one address:
             guesses answered per second; a correct login from another address meanwhile

Prints one line per probe ("0 of N relayed") and exits non-zero when any probe fails.
Usage: python3 bench/attack.py [--postern PATH] [--only relay,smuggle,...] [--keep]
"""
import argparse
import asyncio
import base64
import imaplib
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

from loopback import free_port, smtp_reply

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = []
NOVERIFY = ssl.create_default_context()
NOVERIFY.check_hostname = False
NOVERIFY.verify_mode = ssl.CERT_NONE


def result(probe, bad, tried, what, note=""):
    RESULTS.append((probe, bad, tried, what, note))
    print(f"[attack] {probe}: {bad} of {tried} {what}{' (' + note + ')' if note else ''}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ sinks
class Sink:
    """A recording SMTP server (threads-free: runs in the asyncio loop of the caller)."""

    def __init__(self):
        self.port = free_port()
        self.messages = []

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)

    async def handle(self, r, w):
        try:
            w.write(b"220 sink ESMTP\r\n")
            rcpts = []
            while True:
                line = await r.readline()
                if not line:
                    return
                c = line[:4].upper()
                if c == b"EHLO":
                    w.write(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif c == b"RCPT":
                    rcpts.append(line[8:].strip().decode("latin1"))
                    w.write(b"250 ok\r\n")
                elif c == b"DATA":
                    w.write(b"354 go\r\n")
                    await w.drain()
                    data = b""
                    while True:
                        l = await r.readline()
                        if not l or l == b".\r\n":
                            break
                        data += l
                    self.messages.append((rcpts, data))
                    rcpts = []
                    w.write(b"250 ok\r\n")
                elif c == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    return
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            w.close()


# ------------------------------------------------------------------ postern
def start_postern(a, base, backend, world, dns_port):
    ports = {k: free_port() for k in ("relay", "submission", "imaps", "pop3s", "imap", "pop3", "metrics")}
    pol = os.path.join(base, "policies")
    os.makedirs(pol)
    pw = subprocess.run([a.postern, "passwd"], input="secret-pass\nsecret-pass\n", capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with open(os.path.join(pol, "users.toml"), "w") as f:
        for u in ("alice", "bob"):
            f.write(f'[[user]]\nlogin = "{u}@example.net"\npassword = "{pw}"\naddresses = ["{u}@example.net"]\nrole = "user"\n\n')
    cfg = os.path.join(base, "postern.toml")
    with open(cfg, "w") as f:
        f.write(f"""[server]
hostname = "mx.attack.test"
data_dir = "{base}/data"

[smtp]
relay = ["127.0.0.1:{ports['relay']}"]
submission = ["127.0.0.1:{ports['submission']}"]
submissions = []
max_connections_per_ip = 500
connection_rate_per_ip = "100000/1m"

[relay]
domains = ["example.net"]
networks = ["127.0.0.1/32"]

[delivery]
route = "smtp://127.0.0.1:{backend.port}"
outbound = "smtp://127.0.0.1:{world.port}"
retry = ["1s"]

[dns]
nameservers = ["127.0.0.1:{dns_port}"]

[checks]
deadline = "3s"

[rules]
dir = "{REPO}/rules"

[policies]
dir = "{pol}"

[quarantine]
pop3 = ["127.0.0.1:{ports['pop3']}"]
pop3s = ["127.0.0.1:{ports['pop3s']}"]
imap = ["127.0.0.1:{ports['imap']}"]
imaps = ["127.0.0.1:{ports['imaps']}"]
max_connections_per_ip = 500

[metrics]
listen = "127.0.0.1:{ports['metrics']}"
""")
    log = open(os.path.join(base, "postern.log"), "ab")
    proc = subprocess.Popen([a.postern, "serve", "--config", cfg], stdout=log, stderr=log, env=dict(os.environ, POSTERN_LOG="warn"))
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", ports["imaps"]), 0.2).close()
            return proc, ports
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    raise RuntimeError("postern did not start: " + open(os.path.join(base, "postern.log")).read()[-2000:])


# ------------------------------------------------------------------ SMTP helpers
async def reply(r, timeout=15):
    return await smtp_reply(r, timeout, closed="(closed)")


async def smtp(port, src="127.0.0.2"):
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    await reply(r)
    return r, w


async def cmd(r, w, line):
    w.write(line if isinstance(line, bytes) else line.encode("latin1"))
    if not (line.endswith(b"\n") if isinstance(line, bytes) else line.endswith("\n")):
        w.write(b"\r\n")
    await w.drain()
    return await reply(r)


async def starttls(r, w):
    """Upgrade an asyncio stream after a 220 to STARTTLS (Python 3.11 start_tls)."""
    await w.start_tls(NOVERIFY, server_hostname="mx.attack.test")
    return r, w


async def settle(sinks, seconds=3):
    await asyncio.sleep(seconds)


# ------------------------------------------------------------------ probes
RELAY_TRICKS = [
    "<victim@world.test>",
    "<VICTIM@WORLD.TEST>",
    "<victim@world.test.>",
    "<victim%world.test@example.net>",
    "<victim%world.test@[127.0.0.1]>",
    "<@example.net:victim@world.test>",
    "<@example.net,@world.test:victim@world.test>",
    "<world.test!victim@example.net>",
    "<world.test!victim>",
    '<"victim@world.test">',
    '<"victim@world.test"@example.net>',
    "<victim@world.test@example.net>",
    "<victim@example.net@world.test>",
    "<victim@[127.0.0.1]>",
    "<victim@[IPv6:::1]>",
    "<victim@localhost>",
    "<victim@example.net.world.test>",
    "<victim@world.test> SIZE=100",
    "victim@world.test",
    "<victim@world.test",
    "<victim@world.test>>",
    "< victim@world.test >",
    "<victim@world.test\t>",
    "<victim@xn--wrld-lra.test>",
    "<postmaster@world.test>",
    "<victim@example.net\\@world.test>",
    "<victim(comment)@world.test>",
    "<victim@world.test(example.net)>",
    "<victim@example.net%world.test>",
    "<victim%40world.test@example.net>",
]


async def probe_relay(ctx):
    world, before = ctx["world"], len(ctx["world"].messages)
    tried = 0
    for trick in RELAY_TRICKS:
        for mail_from in ("<spoof@example.net>", "<x@far.test>", "<>"):
            tried += 1
            try:
                r, w = await smtp(ctx["ports"]["relay"])
                await cmd(r, w, "EHLO far.test")
                await cmd(r, w, f"MAIL FROM:{mail_from}")
                rep = await cmd(r, w, f"RCPT TO:{trick}")
                if rep.startswith("250"):
                    if (await cmd(r, w, "DATA")).startswith("354"):
                        await cmd(r, w, b"Subject: relay test\r\nMessage-ID: <relay@far.test>\r\n\r\nrelay?\r\n.\r\n")
                w.close()
            except (OSError, asyncio.TimeoutError):
                pass
    await settle(ctx)
    relayed = len(world.messages) - before
    result("open relay tricks from an outside address", relayed, tried, "relayed")
    return relayed == 0


ENDS = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
    b"\r\r\n.\r\r\n", b"\n\n.\n\n", b"\r\n .\r\n", b"\r\n.\r\r\n", b"\r\n.\n\r\n",
]


async def probe_smuggle(ctx):
    backend = ctx["backend"]
    tried, smuggled = 0, 0
    for tls in (False, True):
        for pipelined in (False, True):
            for i, end in enumerate(ENDS):
                tried += 1
                tag = f"SMUGGLED-{int(tls)}{int(pipelined)}-{i}"
                inner = (
                    b"MAIL FROM:<admin@example.net>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
                    b"From: admin@example.net\r\nSubject: " + tag.encode() + b"\r\n\r\nsmuggled\r\n.\r\n"
                )
                outer = b"From: x@far.test\r\nSubject: outer " + tag.encode() + b"\r\n\r\nhello" + end + inner
                try:
                    r, w = await smtp(ctx["ports"]["relay"])
                    await cmd(r, w, "EHLO far.test")
                    if tls:
                        if not (await cmd(r, w, "STARTTLS")).startswith("220"):
                            continue
                        await starttls(r, w)
                        await cmd(r, w, "EHLO far.test")
                    if pipelined:
                        w.write(b"MAIL FROM:<x@far.test>\r\nRCPT TO:<alice@example.net>\r\nDATA\r\n" + outer + b"\r\n.\r\nQUIT\r\n")
                        await w.drain()
                        await asyncio.wait_for(r.read(), 15)
                    else:
                        await cmd(r, w, "MAIL FROM:<x@far.test>")
                        await cmd(r, w, "RCPT TO:<alice@example.net>")
                        if (await cmd(r, w, "DATA")).startswith("354"):
                            w.write(outer + b"\r\n.\r\n")
                            await w.drain()
                            await reply(r)
                            for _ in range(4):
                                await reply(r, timeout=3)
                    w.close()
                except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                    pass
    await settle(ctx, 4)
    for rcpts, data in backend.messages:
        # smuggled = the inner message arrived as a message of its own
        m = re.search(rb"(?m)^Subject: (SMUGGLED-\S+)", data)
        if m and not re.search(rb"(?m)^Subject: outer", data):
            smuggled += 1
    result("SMTP smuggling (14 end-of-data look-alikes x pipelined/not x plain/STARTTLS)", smuggled, tried, "smuggled")
    return smuggled == 0


FORGED_AR = [
    "Authentication-Results: mx.attack.test; dkim=pass header.d=forged.test",
    "Authentication-Results: MX.ATTACK.TEST; dkim=pass header.d=forged.test",
    "Authentication-Results: mx.attack.test.; dkim=pass header.d=forged.test",
    "Authentication-Results: (comment) mx.attack.test; dkim=pass header.d=forged.test",
    "Authentication-Results: mx.attack.test 1; dkim=pass header.d=forged.test",
    "Authentication-Results:\r\n mx.attack.test;\r\n dkim=pass header.d=forged.test",
    "authentication-results: mx.attack.test; dkim=pass header.d=forged.test",
    "Authentication-Results : mx.attack.test; dkim=pass header.d=forged.test",
    "Authentication-Results: mx.attack.test;dkim=pass header.d=forged.test",
    "Authentication-Results: Mx.Attack.Test.; dkim=pass header.d=forged.test",
]


async def probe_headers(ctx):
    backend = ctx["backend"]
    before = len(backend.messages)
    for i, h in enumerate(FORGED_AR):
        r, w = await smtp(ctx["ports"]["relay"])
        await cmd(r, w, "EHLO far.test")
        await cmd(r, w, "MAIL FROM:<x@far.test>")
        await cmd(r, w, "RCPT TO:<alice@example.net>")
        await cmd(r, w, "DATA")
        await cmd(r, w, (h + f"\r\nSubject: forged-ar-{i}\r\nFrom: x@far.test\r\n\r\nbody\r\n.\r\n").encode())
        w.close()
    await settle(ctx)
    survived = 0
    got = backend.messages[before:]
    for _, data in got:
        if b"forged.test" in data:
            survived += 1
    result("forged Authentication-Results naming this host", survived, len(FORGED_AR), "survived", f"{len(got)} delivered")
    # EHLO that tries to forge a Received date
    before = len(backend.messages)
    bad_helos = ["x; Tue, 1 Jan 2030 00:00:00 +0000", "x (y) by evil", "x\tby evil.test; Tue, 1 Jan 2030 00:00:00 +0000"]
    forged = 0
    for i, helo in enumerate(bad_helos):
        r, w = await smtp(ctx["ports"]["relay"])
        rep = await cmd(r, w, f"EHLO {helo}")
        if rep.startswith("250"):
            await cmd(r, w, "MAIL FROM:<x@far.test>")
            await cmd(r, w, "RCPT TO:<alice@example.net>")
            await cmd(r, w, "DATA")
            await cmd(r, w, f"Subject: helo-{i}\r\nFrom: x@far.test\r\n\r\nbody\r\n.\r\n".encode())
        w.close()
    await settle(ctx)
    for _, data in backend.messages[before:]:
        top = re.search(rb"(?s)^Received:(.*?)\r\n(?! |\t)", data)
        # a parser that splits at the first ';' takes the client's text for the date
        parts = top.group(1).split(b";") if top else []
        if len(parts) > 1 and b"2030" in parts[1]:
            forged += 1
    result("EHLO names that forge the Received date", forged, len(bad_helos), "forged")
    return survived == 0 and forged == 0


async def quarantine_for(ctx, user, subject):
    r, w = await smtp(ctx["ports"]["relay"])
    await cmd(r, w, "EHLO far.test")
    await cmd(r, w, "MAIL FROM:<x@far.test>")
    await cmd(r, w, f"RCPT TO:<{user}@example.net>")
    await cmd(r, w, "DATA")
    msg = (
        f"From: x@far.test\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
        '--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="invoice.exe"\r\n\r\nTVqQ\r\n--b--\r\n.\r\n'
    )
    rep = await cmd(r, w, msg.encode())
    w.close()
    return rep


def probe_isolation_sync(ctx):
    tried, leaked = 0, 0
    secret = "BOB-SECRET-SUBJECT"
    # IMAP as alice
    m = imaplib.IMAP4_SSL("127.0.0.1", ctx["ports"]["imaps"], ssl_context=NOVERIFY)
    m.login("alice@example.net", "secret-pass")
    for box in ("INBOX", "../bob@example.net", "bob@example.net", "INBOX/../../bob", "%", "*", "Release",
                '"INBOX\x00bob"', "~bob", "/INBOX", "inbox", "#shared/bob", "Other Users/bob"):
        tried += 1
        try:
            typ, _ = m.select(box)
        except imaplib.IMAP4.error:
            continue
        if typ != "OK":
            continue
        for q in ("1:*", "1:4294967295", "*"):
            for fetch in (m.fetch, lambda s, w: m.uid("FETCH", s, w)):
                tried += 1
                try:
                    _, data = fetch(q, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                except imaplib.IMAP4.error:
                    continue
                if secret in repr(data):
                    leaked += 1
        for crit in ("ALL", f'SUBJECT "{secret}"', "TEXT BOB"):
            tried += 1
            try:
                _, data = m.search(None, crit)
            except imaplib.IMAP4.error:
                continue
            ids = data[0].split() if data and data[0] else []
            if ids:
                _, d2 = m.fetch(b",".join(ids).decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                if secret in repr(d2):
                    leaked += 1
    try:
        m.logout()
    except imaplib.IMAP4.error:
        pass
    # POP3 as alice
    p = poplib.POP3_SSL("127.0.0.1", ctx["ports"]["pop3s"], context=NOVERIFY)
    p.user("alice@example.net")
    p.pass_("secret-pass")
    n = len(p.list()[1])
    for i in list(range(0, n + 3)) + [2**31, 2**32 + 1, -1]:
        for c in ("RETR", "TOP"):
            tried += 1
            try:
                resp = p._longcmd(f"{c} {i}" + (" 0" if c == "TOP" else ""))
            except poplib.error_proto:
                continue
            if secret in repr(resp):
                leaked += 1
    p.quit()
    return tried, leaked


async def probe_isolation(ctx):
    for u, s in (("alice", "alice-held"), ("bob", "BOB-SECRET-SUBJECT"), ("bob", "BOB-SECRET-SUBJECT 2")):
        await quarantine_for(ctx, u, s)
    await asyncio.sleep(1)
    tried, leaked = await asyncio.to_thread(probe_isolation_sync, ctx)
    result("user isolation over IMAP and POP3 (alice asks for bob's mail)", leaked, tried, "leaked")
    return leaked == 0


def imap_login(port, src, user, pw):
    s = socket.create_connection(("127.0.0.1", port), 30, source_address=(src, 0))
    t = NOVERIFY.wrap_socket(s, server_hostname="mx.attack.test")
    t.settimeout(60)
    f = t.makefile("rb")
    f.readline()
    t.sendall(f'a LOGIN "{user}" "{pw}"\r\n'.encode())
    while True:
        line = f.readline()
        if not line or line.startswith(b"a "):
            t.close()
            return line.decode("latin1").strip()


async def probe_brute(ctx, parallel=200):
    import concurrent.futures

    port = ctx["ports"]["imaps"]
    pool = concurrent.futures.ThreadPoolExecutor(parallel + 2)  # every login really in parallel
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    tasks = [loop.run_in_executor(pool, imap_login, port, "127.0.0.50", "alice@example.net", f"guess{i}") for i in range(parallel)]
    good = loop.run_in_executor(pool, imap_login, port, "127.0.0.51", "bob@example.net", "secret-pass")

    async def timed_good():
        await asyncio.sleep(1)
        g0 = time.monotonic()
        rep = await good
        return rep, time.monotonic() - g0

    out = await asyncio.gather(*tasks, timed_good(), return_exceptions=True)
    elapsed = time.monotonic() - t0
    answers = [x for x in out[:-1] if isinstance(x, str)]
    checked_wrong = sum(1 for x in answers if "AUTHENTICATIONFAILED" in x or ("NO" in x and "UNAVAILABLE" not in x))
    refused = sum(1 for x in answers if "UNAVAILABLE" in x or "LIMIT" in x)
    good_rep, good_t = out[-1] if isinstance(out[-1], tuple) else (repr(out[-1]), 0)
    rate = len(answers) / elapsed if elapsed else 0
    note = (f"answered in {elapsed:.1f} s ({rate:.0f}/s): {checked_wrong} 'wrong password', {refused} refused over budget; "
            f"bob from 127.0.0.51 meanwhile: '{good_rep[:30]}' in {good_t:.2f} s")
    # "bad" = a wrong password checked beyond a small budget (10) in that burst
    result(f"{parallel} parallel wrong IMAP logins from one address", max(0, checked_wrong - 10), parallel, "checked beyond a budget of 10", note)
    return good_rep.startswith("a OK")


PROBES = {"relay": probe_relay, "smuggle": probe_smuggle, "headers": probe_headers, "isolation": probe_isolation, "brute": probe_brute}


async def run(a, base):
    backend, world = Sink(), Sink()
    await backend.start()
    await world.start()
    dns_port = free_port()
    dns = subprocess.Popen([sys.executable, os.path.join(HERE, "dns_stub.py"), "--port", str(dns_port)], stderr=subprocess.DEVNULL)
    proc, ports = start_postern(a, base, backend, world, dns_port)
    ctx = {"ports": ports, "backend": backend, "world": world}
    ok = True
    try:
        for name in a.only.split(","):
            try:
                ok = await PROBES[name](ctx) and ok
            except Exception as e:  # a probe that breaks is a finding too
                result(name, 1, 1, "probe failed", f"{type(e).__name__}: {e}")
                ok = False
        alive = proc.poll() is None
        result("gateway still running after all probes", 0 if alive else 1, 1, "crashed")
        ok = ok and alive
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        dns.terminate()
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--postern", default=os.path.join(REPO, "target", "release", "postern"))
    ap.add_argument("--only", default="relay,smuggle,headers,isolation,brute")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="postern-attack.")
    try:
        ok = asyncio.run(run(a, base))
    finally:
        if a.keep:
            print(f"[attack] kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nattack.py {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}\n")
    print("| probe | tries | outcome |\n|---|---|---|")
    for probe, bad, tried, what, note in RESULTS:
        print(f"| {probe} | {tried} | {bad} {what}{'; ' + note if note else ''} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
