#!/usr/bin/env python3
"""Latency probe for bench/throughput.sh (Python standard library only).

Runs PROBES sessions alongside the load generator (smtp-source). Each session
loops: open a NEW TCP connection, 220, EHLO, MAIL, RCPT, DATA, 354, send the
message (headers + --size payload bytes + CRLF.CRLF), and time

    t0 = the moment sendall() of the final "\\r\\n.\\r\\n" returned (the whole
         message, final dot included, is in the kernel's socket buffer)
    t1 = the moment the server's reply line to the final dot was read

then QUIT and close. Only replies starting "250" are counted as samples;
anything else is counted as an error (and printed once). It stops when the
file --stop exists (the load generator has finished), or after --max-seconds.

Output (one JSON object on stdout): count of messages accepted, errors, and
the DATA-end->250 latency percentiles in milliseconds (nearest-rank), plus
the whole-transaction (connect..250) percentiles.
"""
import argparse
import json
import math
import os
import socket
import sys
import threading
import time


def pct(sorted_vals, p):
    """Nearest-rank percentile of an ascending list (p in 0..100)."""
    if not sorted_vals:
        return None
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[k - 1]


class Session:
    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    def reply(self):
        """Read one (possibly multi-line) reply; return (code, last line)."""
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("connection closed by server")
            if len(line) < 4 or line[3:4] != b"-":
                return line[:3].decode("ascii", "replace"), line.decode("ascii", "replace").rstrip()

    def cmd(self, text, want):
        self.sock.sendall(text.encode("ascii") + b"\r\n")
        code, line = self.reply()
        if code != want:
            raise RuntimeError(f"{text.split(':')[0]!r} -> {line!r}")
        return line

    def close(self):
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def make_body(size, n, sender, rcpt):
    hdr = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\n"
        f"Subject: postern latency probe {n}\r\n"
        f"Message-ID: <probe-{os.getpid()}-{n}@client.example.test>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n"
    )
    line = ("x" * 76) + "\r\n"           # 78 bytes a line, like a wrapped text body
    payload = line * max(1, -(-size // len(line)))   # whole lines, at least SIZE bytes
    return (hdr + payload).encode("ascii") + b".\r\n"


def worker(idx, a, out, errs, lock):
    n = 0
    deadline = time.monotonic() + a.max_seconds
    while not os.path.exists(a.stop) and time.monotonic() < deadline:
        n += 1
        body = make_body(a.size, f"{idx}-{n}", a.sender, a.rcpt)
        s = None
        try:
            c0 = time.perf_counter()
            s = Session(a.host, a.port, a.timeout)
            code, line = s.reply()
            if code != "220":
                raise RuntimeError(f"greeting {line!r}")
            s.cmd(f"EHLO {a.helo}", "250")
            m0 = time.perf_counter()
            s.cmd(f"MAIL FROM:<{a.sender}>", "250")
            m1 = time.perf_counter()
            s.cmd(f"RCPT TO:<{a.rcpt}>", "250")
            s.cmd("DATA", "354")
            s.sock.sendall(body)
            t0 = time.perf_counter()
            code, line = s.reply()
            t1 = time.perf_counter()
            if code != "250":
                raise RuntimeError(f"end of DATA -> {line!r}")
            with lock:
                out.append((t1 - t0, t1 - c0, m1 - m0))
            try:
                s.sock.sendall(b"QUIT\r\n")
                s.reply()
            except (OSError, ConnectionError):
                pass
        except Exception as e:  # noqa: BLE001 - a probe counts every failure
            with lock:
                errs.append(str(e))
            time.sleep(0.05)
        finally:
            if s:
                s.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--probes", type=int, default=2, help="concurrent probe sessions")
    p.add_argument("--size", type=int, default=4096, help="payload bytes (like smtp-source -l)")
    p.add_argument("--sender", default="probe@example.test")
    p.add_argument("--rcpt", default="rcpt@example.net")
    p.add_argument("--helo", default="client.example.test")
    p.add_argument("--stop", required=True, help="stop when this file exists")
    p.add_argument("--ready", help="create this file once the probe sessions are started")
    p.add_argument("--max-seconds", type=float, default=600)
    p.add_argument("--timeout", type=float, default=60, help="socket timeout per operation")
    a = p.parse_args()

    out, errs, lock = [], [], threading.Lock()
    threads = [threading.Thread(target=worker, args=(i, a, out, errs, lock), daemon=True) for i in range(a.probes)]
    for t in threads:
        t.start()
    if a.ready:
        open(a.ready, "w").close()
    for t in threads:
        t.join()

    lat = sorted(x[0] * 1000 for x in out)
    tx = sorted(x[1] * 1000 for x in out)
    mail = sorted(x[2] * 1000 for x in out)
    r3 = lambda v: None if v is None else round(v, 3)
    res = {
        "method": "python stdlib probe, new connection per message, DATA-end->250",
        "probes": a.probes,
        "messages": len(lat),
        "errors": len(errs),
        "first_error": errs[0] if errs else None,
        "dot_to_250_ms": {k: r3(pct(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        # MAIL FROM -> 250: where the rate limits are checked ([cluster] redis: one Redis call).
        "mail_to_250_ms": {k: r3(pct(mail, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "transaction_ms": {k: r3(pct(tx, q)) for k, q in (("p50", 50), ("p99", 99), ("max", 100))},
    }
    json.dump(res, sys.stdout)
    print()
    return 0 if lat else 1


if __name__ == "__main__":
    sys.exit(main())
