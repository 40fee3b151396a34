#!/usr/bin/env python3
"""memory.py — Postern's resident memory (VmRSS) through one run (issue 8).

Starts target/release/postern on loopback with a temporary config and prints:
  idle                 RSS after start
  N idle connections   RSS with N greeted SMTP connections held open, and bytes per connection
  after they close     RSS a few seconds after they all closed
  big messages         RSS right after M messages of SIZE bytes were sent concurrently and queued
  after idle           RSS after IDLE seconds of nothing
  (the big-message round runs ROUNDS times: RSS that stays level is bounded)

  python3 bench/memory.py            # N=10000 M=20 SIZE=5000000 IDLE=30 ROUNDS=3
  N=2000 python3 bench/memory.py     # env knobs: N M SIZE IDLE ROUNDS SOURCES POSTERN KEEP

Connections come from SOURCES (8) addresses 127.0.0.2..; the config exempts
127.0.0.0/8 from the per-IP caps ([relay] networks) anyway. The script raises
its own RLIMIT_NOFILE to the hard limit; postern raises its own at start.
Everything it starts is stopped by PID at exit.
"""
import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from loopback import free_port, rss_kb

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
N = int(os.environ.get("N", "10000"))
M = int(os.environ.get("M", "20"))
SIZE = int(os.environ.get("SIZE", "5000000"))
IDLE = float(os.environ.get("IDLE", "30"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SOURCES = int(os.environ.get("SOURCES", "8"))
POSTERN = os.environ.get("POSTERN", os.path.join(REPO, "target/release/postern"))
KEEP = os.environ.get("KEEP", "0") == "1"


def rss(pid):
    return rss_kb(pid) * 1024


def mb(b):
    return f"{b / 1e6:8.1f} MB"


async def hold(port, src):
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    line = await r.readline()
    if not line.startswith(b"220"):
        raise RuntimeError(f"greeting: {line!r}")
    return r, w


async def send_big(port, i, body):
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def cmd(line):
        if line is not None:
            w.write(line)
            await w.drain()
        reply = b""
        while True:
            l = await r.readline()
            reply += l
            if len(l) < 4 or l[3:4] != b"-":
                return reply

    await cmd(None)
    await cmd(b"EHLO bench.test\r\n")
    await cmd(f"MAIL FROM:<b{i}@bench.test>\r\n".encode())
    await cmd(b"RCPT TO:<u@example.test>\r\n")
    await cmd(b"DATA\r\n")
    w.write(body)
    reply = await cmd(b".\r\n")
    w.close()
    return reply.startswith(b"250")


def body(i):
    line = f"{i:04} abcdefghijklmnopqrstuvwxyz0123456789 abcdefghijklmnopqrstuvwxyz\r\n".encode()
    head = f"From: b{i}@bench.test\r\nSubject: big {i}\r\n\r\n".encode()
    return head + line * ((SIZE - len(head)) // len(line))


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < N + 100:
        sys.exit(f"hard RLIMIT_NOFILE {hard} is below N={N}")
    d = tempfile.mkdtemp(prefix="postern-mem-")
    smtp, metrics = free_port(), free_port()
    cfg = f"""
[server]
hostname = "bench.test"
data_dir = "{d}/data"
[smtp]
relay = ["127.0.0.1:{smtp}"]
max_message_size = "{max(SIZE * 2, 25_000_000)}"
max_connections = {N + 1000}
max_connections_per_ip = {N + 1000}
connection_rate_per_ip = "{N * 10}/1m"
[relay]
domains = ["example.test"]
networks = ["127.0.0.0/8"]
[delivery]
route = "maildir:{d}/maildir"
outbound = "smtp://127.0.0.1:9"
[checks]
spf = false
dkim = false
dmarc = false
[rules]
dir = "{REPO}/rules"
[policies]
dir = "{d}/policies"
[metrics]
listen = "127.0.0.1:{metrics}"
"""
    os.makedirs(f"{d}/policies")
    open(f"{d}/policies/ratelimits.toml", "w").close()
    open(f"{d}/policies/users.toml", "w").close()
    open(f"{d}/postern.toml", "w").write(cfg)
    log = open(f"{d}/postern.log", "w")
    p = subprocess.Popen([POSTERN, "serve", "--config", f"{d}/postern.toml"],
                         stdout=subprocess.DEVNULL, stderr=log,
                         env={**os.environ, "POSTERN_LOG": "warn"})
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", smtp), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(1)
        idle = rss(p.pid)
        print(f"binary              {POSTERN}")
        print(f"idle                {mb(idle)}")

        conns = []
        srcs = [f"127.0.0.{2 + k}" for k in range(SOURCES)]
        for start in range(0, N, 500):
            conns += await asyncio.gather(*(hold(smtp, srcs[i % SOURCES])
                                            for i in range(start, min(N, start + 500))))
        time.sleep(2)
        held = rss(p.pid)
        print(f"{N} idle conns     {mb(held)}   ({(held - idle) / N:,.0f} bytes per connection)")
        for _, w in conns:
            w.close()
        conns.clear()
        # asyncio.sleep, not time.sleep: the closes happen on the event loop.
        await asyncio.sleep(5)
        print(f"after they close    {mb(rss(p.pid))}")

        bodies = [body(i) for i in range(M)]
        for r in range(1, ROUNDS + 1):
            ok = await asyncio.gather(*(send_big(smtp, i, b) for i, b in enumerate(bodies)))
            print(f"{M} x {SIZE / 1e6:.0f} MB sent, #{r}   {mb(rss(p.pid))}   ({sum(ok)} of {M} got 250)")
            await asyncio.sleep(IDLE)
            print(f"after {IDLE:.0f} s idle      {mb(rss(p.pid))}")
    finally:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
        if KEEP:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


asyncio.run(main())
