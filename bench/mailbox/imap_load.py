#!/usr/bin/env python3
"""imap_load.py — IMAP load on postern's quarantine (Python stdlib only, asyncio).

N clients for D seconds, each looping one whole session:

  connect (+ greeting) -> STARTTLS + handshake (or IMAPS handshake) -> LOGIN -> SELECT INBOX
  -> FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE) -> FETCH <random> BODY[]
  -> STORE <same> +FLAGS (\\Flagged) -> STORE <same> -FLAGS (\\Flagged) -> NOOP -> LOGOUT

Each step is timed from the first byte sent to the tagged completion read (connect: to the
greeting; starttls: the command plus the TLS handshake). Errors: any tagged NO/BAD, any
untagged BAD, a missing greeting/BYE, a timeout or a socket exception, and protocol checks
the client can make without racing other sessions:
  - SELECT reports EXISTS; FETCH 1:* returns exactly EXISTS FETCH responses, each with
    FLAGS, ENVELOPE and RFC822.SIZE;
  - BODY[] is a literal whose length equals that message's RFC822.SIZE;
  - STORE +FLAGS/-FLAGS answers with an untagged FETCH for that message (flag contents are
    only compared when no other client shares the login: --users gives one login per
    client at most, else "flag races" are counted apart, not as errors).

Long-session mode (--long): each client connects, logs in and SELECTs once, then loops a
headers-first client's mix for D seconds (a connection is opened again only after an error):

  FETCH a:a+49 (FLAGS ENVELOPE RFC822.SIZE)            x3   fetch_env
  UID FETCH u:u+49 (BODY.PEEK[HEADER.FIELDS (...)])     x2   fetch_hdr
  FETCH n (BODYSTRUCTURE)                               x2   fetch_bs
  FETCH n BODY[]                                        x1   fetch_body
  SEARCH SUBJECT w / SEARCH FROM w / SEARCH TEXT w      x1   search_subj/search_from/search_text
  STORE n +FLAGS (\Flagged), STORE n -FLAGS (\Flagged) x1   store_add/store_del
  NOOP                                                  x2   noop

Checks (any failure is an error, as is any NO/BAD): EXISTS stays what SELECT said (the
bench expunges nothing); each FETCH answers every message of its range with the items asked
(a literal per header fetch, BODYSTRUCTURE with a parenthesised value); BODY[] is as long as
the RFC822.SIZE reported for it; SEARCH answers one `* SEARCH` whose numbers are within
EXISTS, and non-empty for the subject words the generator always uses (--words); STORE
answers the message's FLAGS (when other clients share the login, a FLAGS showing their
change, or no FETCH at all because they made the same change first, is a "flag race").
Prints commands/s and per-command ok/err/p50/p99. --procs P spreads the clients over P
processes so that the client is not the bottleneck.

Usage: imap_load.py --port P [--mode starttls|imaps|plain] --users FILE [--clients 20]
                    [--duration 60] [--timeout 15] [--ramp 1] [--json OUT] [--seed S]
                    [--long [--procs 1] [--words w1,w2] [--label NAME]]
FILE: one "login password" per line; client i uses line i mod len.
"""

import argparse
import asyncio
import json
import random
import re
import ssl
import statistics
import sys
import time
from collections import defaultdict

STEPS = ["connect", "starttls", "login", "select", "fetch_all", "fetch_body",
         "store_add", "store_del", "noop", "logout"]


class ProtoError(Exception):
    """A protocol-level failure: NO/BAD, a malformed or missing response."""


class Stats:
    def __init__(self):
        self.lat = defaultdict(list)        # step -> [seconds]
        self.ok = defaultdict(int)
        self.err = defaultdict(int)         # step -> count
        self.err_kinds = defaultdict(int)   # "step: kind" -> count
        self.samples = []                   # first error details
        self.sessions = 0
        self.flag_races = 0
        self.unsolicited = 0

    def error(self, step, kind, detail):
        self.err[step] += 1
        self.err_kinds[f"{step}: {kind}"] += 1
        if len(self.samples) < 25:
            self.samples.append(f"{time.strftime('%H:%M:%S')} {step}: {kind}: {detail}")


LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class Conn:
    def __init__(self, reader, writer, timeout):
        self.r, self.w, self.timeout = reader, writer, timeout
        self.n = 0

    async def read_response_line(self):
        """One response 'line' with its literals inlined: (text_bytes, [literals])."""
        parts, lits = [], []
        while True:
            line = await asyncio.wait_for(self.r.readline(), self.timeout)
            if not line:
                raise ProtoError("connection closed by server")
            if not line.endswith(b"\r\n"):
                raise ProtoError(f"line without CRLF: {line[:80]!r}")
            m = LITERAL.search(line)
            if m:
                n = int(m.group(1))
                data = await asyncio.wait_for(self.r.readexactly(n), self.timeout)
                parts.append(line[:m.start()] + b"{%d}" % len(lits))
                lits.append(data)
                continue
            parts.append(line[:-2])
            return b"".join(parts), lits

    async def command(self, text):
        """Send one command; return (untagged [(line, lits)], tagged status line)."""
        self.n += 1
        tag = b"L%d" % self.n
        self.w.write(tag + b" " + text.encode() + b"\r\n")
        await self.w.drain()
        untagged = []
        while True:
            line, lits = await self.read_response_line()
            if line.startswith(tag + b" "):
                status = line[len(tag) + 1:]
                if not status.startswith(b"OK"):
                    raise ProtoError(f"{text!r} -> {line[:200]!r}")
                return untagged, status
            if line.startswith(b"* BAD"):
                raise ProtoError(f"untagged BAD after {text!r}: {line[:200]!r}")
            if line.startswith(b"+"):
                raise ProtoError(f"unexpected continuation after {text!r}: {line[:200]!r}")
            untagged.append((line, lits))


FETCH_RE = re.compile(rb"^\* (\d+) FETCH \(")
SIZE_RE = re.compile(rb"RFC822\.SIZE (\d+)")
FLAGS_RE = re.compile(rb"FLAGS \(([^)]*)\)")


async def session(cid, args, login, password, shared_login, stats, rnd, stop_at):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    step = "connect"
    writer = None
    timings = {}
    t = time.perf_counter()
    try:
        if args.mode == "imaps":
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port, ssl=ctx), args.timeout)
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port), args.timeout)
        c = Conn(reader, writer, args.timeout)
        greet, _ = await c.read_response_line()
        if not greet.startswith(b"* OK"):
            raise ProtoError(f"greeting {greet[:120]!r}")
        timings["connect"] = time.perf_counter() - t

        if args.mode == "starttls":
            step = "starttls"
            t = time.perf_counter()
            await c.command("STARTTLS")
            await asyncio.wait_for(writer.start_tls(ctx), args.timeout)
            timings["starttls"] = time.perf_counter() - t

        step = "login"
        t = time.perf_counter()
        await c.command(f'LOGIN "{login}" "{password}"')
        timings["login"] = time.perf_counter() - t

        step = "select"
        t = time.perf_counter()
        untagged, status = await c.command("SELECT INBOX")
        timings["select"] = time.perf_counter() - t
        exists = None
        for line, _ in untagged:
            m = re.match(rb"^\* (\d+) EXISTS", line)
            if m:
                exists = int(m.group(1))
        if exists is None:
            raise ProtoError("SELECT without EXISTS")
        if b"READ-WRITE" not in status:
            raise ProtoError(f"SELECT not READ-WRITE: {status!r}")

        sizes = {}
        if exists:
            step = "fetch_all"
            t = time.perf_counter()
            untagged, _ = await c.command("FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)")
            timings["fetch_all"] = time.perf_counter() - t
            for line, lits in untagged:
                m = FETCH_RE.match(line)
                if not m:
                    continue
                seq = int(m.group(1))
                sm = SIZE_RE.search(line)
                if b"ENVELOPE (" in line and sm and b"FLAGS (" in line:
                    sizes[seq] = int(sm.group(1))
            if len(sizes) != exists:
                raise ProtoError(f"FETCH 1:* gave {len(sizes)} complete responses, EXISTS was {exists}")

            step = "fetch_body"
            seq = rnd.randint(1, exists)
            t = time.perf_counter()
            untagged, _ = await c.command(f"FETCH {seq} BODY[]")
            timings["fetch_body"] = time.perf_counter() - t
            body = None
            for line, lits in untagged:
                m = FETCH_RE.match(line)
                if m and int(m.group(1)) == seq and b"BODY[]" in line and lits:
                    body = lits[-1]
            if body is None:
                raise ProtoError(f"FETCH {seq} BODY[] returned no literal: {[u[0][:80] for u in untagged]}")
            if len(body) != sizes[seq]:
                raise ProtoError(f"BODY[] of {seq} is {len(body)} octets, RFC822.SIZE said {sizes[seq]}")

            for step, op, want in (("store_add", "+FLAGS", True), ("store_del", "-FLAGS", False)):
                t = time.perf_counter()
                untagged, _ = await c.command(f"STORE {seq} {op} (\\Flagged)")
                timings[step] = time.perf_counter() - t
                flags = None
                for line, _ in untagged:
                    m = FETCH_RE.match(line)
                    if m and int(m.group(1)) == seq:
                        fm = FLAGS_RE.search(line)
                        if fm:
                            flags = fm.group(1)
                if flags is None:
                    raise ProtoError(f"STORE {seq} {op} without an untagged FETCH FLAGS")
                if (b"\\Flagged" in flags) != want:
                    if shared_login:
                        stats.flag_races += 1
                    else:
                        raise ProtoError(f"STORE {seq} {op} (\\Flagged) answered FLAGS ({flags.decode()})")

        step = "noop"
        t = time.perf_counter()
        untagged, _ = await c.command("NOOP")
        timings["noop"] = time.perf_counter() - t
        stats.unsolicited += len(untagged)

        step = "logout"
        t = time.perf_counter()
        untagged, _ = await c.command("LOGOUT")
        timings["logout"] = time.perf_counter() - t
        if not any(line.startswith(b"* BYE") for line, _ in untagged):
            raise ProtoError("LOGOUT without * BYE")
        stats.sessions += 1
    except ProtoError as e:
        timings.pop(step, None)           # answered, but wrongly: an error, not an ok
        stats.error(step, "protocol", f"{e} (client {cid}, {login})")
    except (asyncio.TimeoutError, TimeoutError):
        stats.error(step, "timeout", f"no answer within {args.timeout}s (client {cid}, {login})")
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
        stats.error(step, type(e).__name__, f"{e} (client {cid}, {login})")
    finally:
        for k, v in timings.items():      # the steps that completed
            stats.lat[k].append(v)
            stats.ok[k] += 1
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except Exception:
                pass


async def client(cid, args, users, stats, stop_at):
    login, password = users[cid % len(users)]
    await asyncio.sleep(args.ramp * cid / max(1, args.clients))   # spread the start
    shared = args.clients > len(users)
    rnd = random.Random(args.seed * 1000 + cid)
    while time.monotonic() < stop_at:
        await session(cid, args, login, password, shared, stats, rnd, stop_at)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["starttls", "imaps", "plain"], default="starttls")
    ap.add_argument("--users", required=True)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--timeout", type=float, default=15)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ramp", type=float, default=1.0, help="spread client starts over this many seconds")
    ap.add_argument("--json")
    ap.add_argument("--long", action="store_true", help="long sessions with a headers-first mix")
    ap.add_argument("--procs", type=int, default=1, help="--long: client processes")
    ap.add_argument("--words", default="invoice,meeting,report,offer,delivery,password,newsletter,urgent",
                    help="--long: subject words every mailbox holds (SEARCH must find them)")
    ap.add_argument("--label", default="", help="--long: a name for the report")
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.long:
        import imap_long
        return await imap_long.run(args)
    users = []
    with open(args.users) as f:
        for line in f:
            if line.strip():
                lg, pw = line.split()
                users.append((lg, pw))
    stats = Stats()
    start = time.monotonic()
    stop_at = start + args.duration
    await asyncio.gather(*(client(i, args, users, stats, stop_at) for i in range(args.clients)))
    elapsed = time.monotonic() - start

    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = ru.ru_utime + ru.ru_stime
    total_ops = sum(stats.ok.values())
    total_err = sum(stats.err.values())
    print(f"IMAP load: {args.clients} clients x {args.duration:.0f} s, mode {args.mode}, "
          f"{len(users)} logins, port {args.port}; wall {elapsed:.1f} s")
    print(f"sessions completed: {stats.sessions} ({stats.sessions / elapsed:.1f}/s); "
          f"commands ok: {total_ops} ({total_ops / elapsed:.1f}/s); errors: {total_err}; "
          f"flag races (shared logins): {stats.flag_races}; unsolicited on NOOP: {stats.unsolicited}")
    print(f"client CPU: {client_cpu:.1f} s ({100 * client_cpu / elapsed:.0f}% of one core)")
    hdr = f"{'step':<11} {'ok':>7} {'err':>5} {'ops/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}"
    print(hdr)
    print("-" * len(hdr))
    rows = {}
    for s in STEPS:
        xs = stats.lat.get(s, [])
        if not xs and not stats.err.get(s):
            continue
        row = {
            "ok": stats.ok.get(s, 0), "err": stats.err.get(s, 0),
            "ops_per_s": stats.ok.get(s, 0) / elapsed,
            "p50_ms": pct(xs, 50) * 1000, "p90_ms": pct(xs, 90) * 1000,
            "p99_ms": pct(xs, 99) * 1000, "max_ms": (max(xs) * 1000 if xs else float("nan")),
            "mean_ms": (statistics.fmean(xs) * 1000 if xs else float("nan")),
        }
        rows[s] = row
        print(f"{s:<11} {row['ok']:>7} {row['err']:>5} {row['ops_per_s']:>8.1f} {row['p50_ms']:>8.2f} "
              f"{row['p90_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['max_ms']:>8.2f} {row['mean_ms']:>8.2f}")
    if stats.err_kinds:
        print("errors by kind:")
        for k, v in sorted(stats.err_kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {v:>6}  {k}")
        print("first errors:")
        for s in stats.samples:
            print("  " + s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clients": args.clients, "duration": args.duration, "mode": args.mode,
                       "elapsed": elapsed, "sessions": stats.sessions, "ops": total_ops,
                       "errors": total_err, "errors_by_kind": stats.err_kinds,
                       "error_samples": stats.samples, "flag_races": stats.flag_races,
                       "steps": rows}, f, indent=1)
    return 1 if total_err else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
