#!/usr/bin/env python3
"""login_rss.py — postern's RSS after bursts of K concurrent IMAP LOGINs (STARTTLS first).

Usage: login_rss.py IMAP_PORT POSTERN_PID K ROUNDS LOGIN_PREFIX PASSWORD
Logins LOGIN_PREFIX01..LOGIN_PREFIX10 are used round-robin. Prints RSS (MB) after each round.
"""
import socket
import ssl
import sys
import threading
import time

port, pid, k, rounds, prefix, pw = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE


def rss():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024


errors = []


def one(i, barrier):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a STARTTLS\r\n")
        f.readline()
        s = ctx.wrap_socket(s)
        f = s.makefile("rb")
        barrier.wait()
        s.sendall(b"b LOGIN %s%02d %s\r\n" % (prefix.encode(), i % 10 + 1, pw.encode()))
        line = f.readline()
        while line and not line.startswith(b"b "):
            line = f.readline()
        if not line.startswith(b"b OK"):
            errors.append(line)
        s.sendall(b"c LOGOUT\r\n")
        s.close()
    except Exception as e:  # noqa: BLE001
        errors.append(repr(e))


out = [f"K={k}: start {rss()} MB"]
for r in range(rounds):
    barrier = threading.Barrier(k)
    ts = [threading.Thread(target=one, args=(i, barrier)) for i in range(k)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    time.sleep(0.5)
    out.append(f"r{r + 1} {rss()}")
print(", ".join(out) + " MB" + (f"; errors: {errors[:3]}" if errors else ""))
sys.exit(1 if errors else 0)
