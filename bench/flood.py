#!/usr/bin/env python3
"""Connection floods and slow clients against a running Postern (stdlib only).

Each subcommand prints one JSON object on stdout; bench/connections.sh starts
Postern with a config that matches and turns these into a table.

  hold       N connections (idle and trickling) spread over many 127.x source
             addresses, held for --hold seconds; meanwhile a fresh client is timed
             (connect -> 220) and sends one message; then --excess more connections
             (counted: 220 vs 421) and --per-ip-extra over the per-IP cap from one
             address; RSS of --pid sampled before, full, after close.
  slowloris  N clients enter DATA and then send one byte every --every seconds;
             how long each lives and what it is told.
  tls-silent N connections to an implicit-TLS port that send nothing, and N that
             stall after STARTTLS; how long each lives; a fresh client on the
             relay port is timed meanwhile.
  senders    N distinct MAIL FROM addresses through the rate limiter (pipelined
             MAIL/RSET over a few sessions); RSS before and after.

Everything goes to loopback. Only sockets this script opened are touched.
"""
import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time

from loopback import rss_kb


def sources(n_addrs, base="127.0.10."):
    """n_addrs loopback source addresses 127.0.10.1, ... 127.0.11.x ..."""
    out = []
    third = int(base.split(".")[2])
    for i in range(n_addrs):
        out.append(f"127.0.{third + i // 250}.{1 + i % 250}")
    return out


async def connect(host, port, src, timeout=10):
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(src, 0), limit=4096), timeout
    )


async def read_reply(reader, timeout=15):
    """One SMTP reply (all its lines); b'' when the peer closed."""
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            return out
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out


async def greeted(host, port, src):
    """(seconds to the greeting, first reply line, reader, writer)."""
    t0 = time.monotonic()
    r, w = await connect(host, port, src)
    rep = await read_reply(r)
    return time.monotonic() - t0, rep.split(b"\r\n")[0].decode("latin1"), r, w


async def send_mail(host, port, src, rcpt, tag):
    """Connect, greet, send one small message; (greet seconds, final reply)."""
    secs, first, r, w = await greeted(host, port, src)
    if not first.startswith("220"):
        w.close()
        return secs, first
    final = ""
    try:
        for cmd in (b"EHLO fresh.bench.test", b"MAIL FROM:<fresh@bench.test>", f"RCPT TO:<{rcpt}>".encode(), b"DATA"):
            w.write(cmd + b"\r\n")
            await w.drain()
            rep = await read_reply(r)
        body = (
            f"From: fresh@bench.test\r\nTo: {rcpt}\r\nSubject: {tag}\r\nMessage-ID: <{tag}@bench.test>\r\n\r\n"
            f"fresh client while the flood holds its connections\r\n.\r\n"
        )
        w.write(body.encode())
        await w.drain()
        final = (await read_reply(r, timeout=60)).decode("latin1").strip()
        w.write(b"QUIT\r\n")
        await w.drain()
    finally:
        w.close()
    return secs, final


async def hold(a):
    srcs = sources(a.addrs)
    result = {"rss_before_kb": rss_kb(a.pid)}
    conns = []
    codes = {"220": 0, "421": 0, "other": 0, "error": 0}

    async def open_one(src, sem):
        async with sem:
            try:
                r, w = await connect(a.host, a.port, src)
                rep = await read_reply(r)
            except (OSError, asyncio.TimeoutError):
                codes["error"] += 1
                return
            code = rep[:3].decode("latin1")
            if code == "220":
                codes["220"] += 1
                conns.append((r, w))
            else:
                codes["421" if code == "421" else "other"] += 1
                w.close()

    # 1. over the per-IP cap from one address (before the total fills up)
    extra = []
    per_ip_codes = {"220": 0, "421": 0, "other": 0}
    for _ in range(a.per_ip + a.per_ip_extra):
        try:
            r, w = await connect(a.host, a.port, "127.0.9.1")
            rep = await read_reply(r)
        except (OSError, asyncio.TimeoutError):
            per_ip_codes["other"] += 1
            continue
        c = rep[:3].decode("latin1")
        per_ip_codes[c if c in per_ip_codes else "other"] += 1
        extra.append(w)
    for w in extra:
        w.close()
    result["per_ip"] = {"tried": a.per_ip + a.per_ip_extra, **per_ip_codes}
    await asyncio.sleep(1)

    # 2. fill: N connections, up to 500 handshakes in flight
    sem = asyncio.Semaphore(500)
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(srcs[i % len(srcs)], sem) for i in range(a.n)))
    result["open"] = dict(codes)
    result["open_seconds"] = round(time.monotonic() - t0, 2)
    result["rss_full_kb"] = rss_kb(a.pid)

    # 3. half of them trickle a NOOP a byte at a time; the rest stay silent
    stop = asyncio.Event()
    trickle_errors = [0]

    async def trickle(w):
        cmd = b"NOOP\r\n"
        i = 0
        while not stop.is_set():
            try:
                w.write(cmd[i % len(cmd) : i % len(cmd) + 1])
                await w.drain()
            except (OSError, ConnectionError):
                trickle_errors[0] += 1
                return
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), a.every)
            except asyncio.TimeoutError:
                pass

    tricklers = [asyncio.create_task(trickle(w)) for (_, w) in conns[: len(conns) // 2]]
    await asyncio.sleep(a.hold / 2)

    # 4. a fresh client meanwhile: greeting time and one delivered message
    secs, final = await send_mail(a.host, a.port, "127.0.8.1", a.rcpt, "fresh-hold")
    result["fresh_greeting_ms"] = round(secs * 1000, 1)
    result["fresh_reply"] = final
    result["rss_held_kb"] = rss_kb(a.pid)

    # 5. the excess over max_connections (kept apart from the held ones)
    held_conns = list(conns)
    before = dict(codes)
    await asyncio.gather(*(open_one(srcs[(a.n + i) % len(srcs)], sem) for i in range(a.excess)))
    result["excess"] = {k: codes[k] - before[k] for k in codes}
    await asyncio.sleep(a.hold / 2)

    # 6. still alive after the hold? (the server must not have cut the idle ones)
    alive = 0
    for r, w in held_conns:
        if not r.at_eof() and not w.is_closing():
            alive += 1
    result["alive_after_hold"] = alive
    result["trickle_errors"] = trickle_errors[0]
    result["rss_end_of_hold_kb"] = rss_kb(a.pid)
    stop.set()
    await asyncio.gather(*tricklers, return_exceptions=True)
    for _, w in conns:
        w.close()
    await asyncio.sleep(a.settle)
    result["rss_after_close_kb"] = rss_kb(a.pid)
    held = max(1, codes["220"])
    result["bytes_per_connection"] = int((result["rss_full_kb"] - result["rss_before_kb"]) * 1024 / held)
    return result


async def slowloris(a):
    srcs = sources(a.addrs, "127.0.20.")
    lives, told, errors = [], {}, [0]
    sem = asyncio.Semaphore(300)

    async def one(src):
        async with sem:
            try:
                r, w = await connect(a.host, a.port, src)
                await read_reply(r)
                for cmd in (b"EHLO slow.bench.test", f"MAIL FROM:<slow-{src}-{id(asyncio.current_task())}@bench.test>".encode(), f"RCPT TO:<{a.rcpt}>".encode(), b"DATA"):
                    w.write(cmd + b"\r\n")
                    await w.drain()
                    rep = await read_reply(r)
                if not rep.startswith(b"354"):
                    errors[0] += 1
                    w.close()
                    return
            except (OSError, asyncio.TimeoutError):
                errors[0] += 1
                return
        t0 = time.monotonic()
        last = b""
        try:
            while time.monotonic() - t0 < a.max_seconds:
                w.write(b"x")
                await w.drain()
                try:
                    data = await asyncio.wait_for(r.read(512), a.every)
                    if not data:
                        break
                    last = data
                except asyncio.TimeoutError:
                    pass
        except (OSError, ConnectionError):
            pass
        lives.append(time.monotonic() - t0)
        key = last.split(b"\r\n")[0][:60].decode("latin1") or "(closed without a reply)"
        told[key] = told.get(key, 0) + 1
        w.close()

    await asyncio.gather(*(one(srcs[i % len(srcs)]) for i in range(a.n)))
    lives.sort()
    return {
        "clients": a.n,
        "setup_errors": errors[0],
        "cut": sum(1 for x in lives if x < a.max_seconds),
        "life_min_s": round(lives[0], 1) if lives else None,
        "life_median_s": round(statistics.median(lives), 1) if lives else None,
        "life_max_s": round(lives[-1], 1) if lives else None,
        "told": told,
    }


async def tls_silent(a):
    srcs = sources(a.addrs, "127.0.30.")
    lives = {"implicit": [], "starttls": []}
    errors = [0]
    sem = asyncio.Semaphore(500)

    async def silent(src):
        async with sem:
            try:
                r, w = await connect(a.host, a.tls_port, src)
            except (OSError, asyncio.TimeoutError):
                errors[0] += 1
                return
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(r.read(), a.max_seconds)
        except (asyncio.TimeoutError, OSError, ConnectionError):
            pass
        lives["implicit"].append(time.monotonic() - t0)
        w.close()

    async def stalled(src):
        async with sem:
            try:
                r, w = await connect(a.host, a.port, src)
                await read_reply(r)
                w.write(b"EHLO stall.bench.test\r\n")
                await w.drain()
                await read_reply(r)
                w.write(b"STARTTLS\r\n")
                await w.drain()
                rep = await read_reply(r)
                if not rep.startswith(b"220"):
                    errors[0] += 1
                    w.close()
                    return
            except (OSError, asyncio.TimeoutError):
                errors[0] += 1
                return
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(r.read(), a.max_seconds)
        except (asyncio.TimeoutError, OSError, ConnectionError):
            pass
        lives["starttls"].append(time.monotonic() - t0)
        w.close()

    tasks = [asyncio.create_task(silent(srcs[i % len(srcs)])) for i in range(a.n)]
    tasks += [asyncio.create_task(stalled(srcs[(a.n + i) % len(srcs)])) for i in range(a.n)]
    await asyncio.sleep(2)
    secs, final = await send_mail(a.host, a.port, "127.0.8.2", a.rcpt, "fresh-tls")
    await asyncio.gather(*tasks)
    out = {"clients_each": a.n, "setup_errors": errors[0], "fresh_greeting_ms": round(secs * 1000, 1), "fresh_reply": final}
    for k, v in lives.items():
        v.sort()
        out[k] = {
            "dropped": sum(1 for x in v if x < a.max_seconds),
            "held": len(v),
            "life_median_s": round(statistics.median(v), 1) if v else None,
            "life_max_s": round(v[-1], 1) if v else None,
        }
    return out


async def senders(a):
    before = rss_kb(a.pid)
    per = a.n // a.sessions
    answers = {}

    async def session(s):
        r, w = await connect(a.host, a.port, f"127.0.40.{1 + s}")
        await read_reply(r)
        w.write(b"EHLO senders.bench.test\r\n")
        await w.drain()
        await read_reply(r)
        batch = 200
        for start in range(0, per, batch):
            n = min(batch, per - start)
            w.write(b"".join(f"MAIL FROM:<u{s}x{start + i}@d{(start + i) % 1000}.bench.test>\r\nRSET\r\n".encode() for i in range(n)))
            await w.drain()
            for _ in range(2 * n):
                rep = await read_reply(r, timeout=60)
                c = rep[:3].decode("latin1")
                answers[c] = answers.get(c, 0) + 1
        w.write(b"QUIT\r\n")
        await w.drain()
        w.close()

    t0 = time.monotonic()
    await asyncio.gather(*(session(s) for s in range(a.sessions)))
    secs = time.monotonic() - t0
    after = rss_kb(a.pid)
    return {
        "senders": per * a.sessions,
        "seconds": round(secs, 1),
        "per_second": int(per * a.sessions / secs),
        "answers": answers,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "bytes_per_key": int((after - before) * 1024 / max(1, per * a.sessions)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["hold", "slowloris", "tls-silent", "senders"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2700)
    p.add_argument("--tls-port", type=int, default=2701)
    p.add_argument("--pid", type=int, default=0, help="postern's PID, for RSS")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--addrs", type=int, default=250, help="source addresses to spread over")
    p.add_argument("--hold", type=float, default=60)
    p.add_argument("--every", type=float, default=3)
    p.add_argument("--excess", type=int, default=300)
    p.add_argument("--per-ip", type=int, default=50)
    p.add_argument("--per-ip-extra", type=int, default=10)
    p.add_argument("--settle", type=float, default=5)
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--rcpt", default="user@example.net")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fn = {"hold": hold, "slowloris": slowloris, "tls-silent": tls_silent, "senders": senders}[a.mode]
    print(json.dumps(asyncio.run(fn(a))))


if __name__ == "__main__":
    sys.exit(main())
