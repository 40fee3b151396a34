"""imap_long.py — the long-session mode of imap_load.py (`--long`); see its docstring."""

import asyncio
import json
import multiprocessing
import random
import re
import ssl
import time
from collections import defaultdict

from imap_load import Conn, ProtoError, pct

# (name, weight) of one round of the mix, in the order they run.
MIX = [("fetch_env", 3), ("fetch_hdr", 2), ("fetch_bs", 2), ("fetch_body", 1),
       ("search_subj", 1), ("search_from", 1), ("search_text", 1),
       ("store_add", 1), ("store_del", 1), ("noop", 2)]
SETUP = ["connect", "starttls", "login", "select", "prime"]
ORDER = SETUP + [m for m, _ in MIX]

FETCH_RE = re.compile(rb"^\* (\d+) FETCH \(")
UID_RE = re.compile(rb"UID (\d+)")
SIZE_RE = re.compile(rb"RFC822\.SIZE (\d+)")
FLAGS_RE = re.compile(rb"FLAGS \(([^)]*)\)")
HDR_FIELDS = "From To Cc Subject Date Message-ID Content-Type"


class LongStats:
    def __init__(self):
        self.lat = defaultdict(list)
        self.err = defaultdict(int)
        self.samples = []
        self.flag_races = 0

    def error(self, step, detail):
        self.err[step] += 1
        if len(self.samples) < 20:
            self.samples.append(f"{time.strftime('%H:%M:%S')} {step}: {detail}")


def fetches(untagged, need):
    """{seq: (line, lits)} of the untagged FETCH responses that contain `need` (others,
    such as flag updates another session caused, may come too)."""
    out = {}
    for line, lits in untagged:
        m = FETCH_RE.match(line)
        if m and need in line:
            out.setdefault(int(m.group(1)), (line, lits))
    return out


def search_hits(untagged, exists, what):
    hits = None
    for line, _ in untagged:
        if line.startswith(b"* SEARCH"):
            if hits is not None:
                raise ProtoError(f"{what}: two * SEARCH responses")
            hits = [int(x) for x in line[8:].split()]
    if hits is None:
        raise ProtoError(f"{what}: no * SEARCH response")
    if any(h < 1 or h > exists for h in hits):
        raise ProtoError(f"{what}: hit outside 1:{exists}: {hits[:10]}")
    return hits


class Client:
    """One long session: the mailbox as SELECT showed it, and the checks per command."""

    def __init__(self, cid, args, login, password, shared, stats, words):
        self.cid, self.args, self.login, self.password = cid, args, login, password
        self.shared, self.stats, self.words = shared, stats, words
        self.rnd = random.Random(args.seed * 1000 + cid)
        self.c = None
        self.writer = None
        self.exists = 0
        self.uids = []      # by seq - 1
        self.sizes = {}     # seq -> RFC822.SIZE

    async def timed(self, step, coro):
        t = time.perf_counter()
        r = await coro
        self.stats.lat[step].append(time.perf_counter() - t)
        return r

    def check_exists(self, untagged, what):
        for line, _ in untagged:
            m = re.match(rb"^\* (\d+) (EXISTS|EXPUNGE)", line)
            if m and (m.group(2) == b"EXPUNGE" or int(m.group(1)) != self.exists):
                raise ProtoError(f"{what}: unexpected {line[:60]!r} (EXISTS was {self.exists})")

    async def open(self):
        a = self.args
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.step = "connect"
        t = time.perf_counter()
        r, w = await asyncio.wait_for(asyncio.open_connection(
            a.host, a.port, ssl=ctx if a.mode == "imaps" else None), a.timeout)
        self.writer = w
        self.c = Conn(r, w, a.timeout)
        greet, _ = await self.c.read_response_line()
        if not greet.startswith(b"* OK"):
            raise ProtoError(f"greeting {greet[:100]!r}")
        self.stats.lat["connect"].append(time.perf_counter() - t)
        if a.mode == "starttls":
            self.step = "starttls"
            t = time.perf_counter()
            await self.c.command("STARTTLS")
            await asyncio.wait_for(w.start_tls(ctx), a.timeout)
            self.stats.lat["starttls"].append(time.perf_counter() - t)
        self.step = "login"
        await self.timed("login", self.c.command(f'LOGIN "{self.login}" "{self.password}"'))
        self.step = "select"
        untagged, status = await self.timed("select", self.c.command("SELECT INBOX"))
        self.exists = None
        for line, _ in untagged:
            m = re.match(rb"^\* (\d+) EXISTS", line)
            if m:
                self.exists = int(m.group(1))
        if not self.exists:
            raise ProtoError(f"SELECT shows no messages: {status!r}")
        self.step = "prime"
        untagged, _ = await self.timed("prime", self.c.command("FETCH 1:* (UID RFC822.SIZE)"))
        got = fetches(untagged, b"RFC822.SIZE")
        if len(got) != self.exists:
            raise ProtoError(f"FETCH 1:* (UID RFC822.SIZE) gave {len(got)} of {self.exists}")
        self.uids = [int(UID_RE.search(got[s][0]).group(1)) for s in range(1, self.exists + 1)]
        self.sizes = {s: int(SIZE_RE.search(got[s][0]).group(1)) for s in got}

    def span(self):
        a = self.rnd.randint(1, max(1, self.exists - 49))
        return a, min(self.exists, a + 49)

    async def one(self, step):
        c, rnd, n = self.c, self.rnd, self.exists
        if step == "fetch_env":
            a, b = self.span()
            untagged, _ = await c.command(f"FETCH {a}:{b} (FLAGS ENVELOPE RFC822.SIZE)")
            got = fetches(untagged, b"ENVELOPE")
            for s in range(a, b + 1):
                line = got.get(s, (b"", []))[0]
                if b"ENVELOPE (" not in line or b"FLAGS (" not in line or not SIZE_RE.search(line):
                    raise ProtoError(f"FETCH {a}:{b}: message {s} incomplete: {line[:100]!r}")
        elif step == "fetch_hdr":
            a, b = self.span()
            ua, ub = self.uids[a - 1], self.uids[b - 1]
            untagged, _ = await c.command(
                f"UID FETCH {ua}:{ub} (BODY.PEEK[HEADER.FIELDS ({HDR_FIELDS})])")
            got = fetches(untagged, b"BODY[")
            for s in range(a, b + 1):
                line, lits = got.get(s, (b"", []))
                if b"BODY[HEADER.FIELDS" not in line or not lits or b"Subject:" not in lits[-1]:
                    raise ProtoError(f"UID FETCH {ua}:{ub} headers: message {s}: {line[:100]!r}")
        elif step == "fetch_bs":
            s = rnd.randint(1, n)
            untagged, _ = await c.command(f"FETCH {s} (BODYSTRUCTURE)")
            line = fetches(untagged, b"BODYSTRUCTURE").get(s, (b"", []))[0]
            if b"BODYSTRUCTURE ((" not in line and b'BODYSTRUCTURE ("' not in line:
                raise ProtoError(f"FETCH {s} BODYSTRUCTURE: {line[:100]!r}")
        elif step == "fetch_body":
            s = rnd.randint(1, n)
            untagged, _ = await c.command(f"FETCH {s} BODY[]")
            line, lits = fetches(untagged, b"BODY[]").get(s, (b"", []))
            if b"BODY[]" not in line or not lits:
                raise ProtoError(f"FETCH {s} BODY[] without a literal: {line[:100]!r}")
            if len(lits[-1]) != self.sizes[s]:
                raise ProtoError(f"BODY[] of {s} is {len(lits[-1])} octets, RFC822.SIZE {self.sizes[s]}")
        elif step.startswith("search_"):
            key = {"search_subj": "SUBJECT", "search_from": "FROM", "search_text": "TEXT"}[step]
            if key == "FROM":
                word = rnd.choice(["mallory", "eve", "billing", "trudy", "nobody-at-all"])
            else:
                word = rnd.choice(self.words)
            untagged, _ = await c.command(f"SEARCH {key} {word}")
            hits = search_hits(untagged, n, f"SEARCH {key} {word}")
            if key == "SUBJECT" and not hits:
                raise ProtoError(f"SEARCH SUBJECT {word} found nothing")
        elif step in ("store_add", "store_del"):
            if step == "store_add":
                self.store_seq = rnd.randint(1, n)
            s = self.store_seq
            op, want = ("+FLAGS", True) if step == "store_add" else ("-FLAGS", False)
            untagged, _ = await c.command(f"STORE {s} {op} (\\Flagged)")
            # the last FLAGS for the message is the state after the STORE
            line = b""
            for ln, _ in untagged:
                m = FETCH_RE.match(ln)
                if m and int(m.group(1)) == s and b"FLAGS (" in ln:
                    line = ln
            fm = FLAGS_RE.search(line)
            if fm is None:
                # Another session of the login made the same change first: a server may
                # then send no FETCH (nothing changed), as Dovecot does.
                if self.shared:
                    self.stats.flag_races += 1
                    return
                raise ProtoError(f"STORE {s} {op} without FETCH FLAGS: {untagged[:2]!r}")
            if (b"\\Flagged" in fm.group(1)) != want:
                if self.shared:
                    self.stats.flag_races += 1
                else:
                    raise ProtoError(f"STORE {s} {op} answered FLAGS ({fm.group(1).decode()})")
        elif step == "noop":
            untagged, _ = await c.command("NOOP")
        else:
            raise AssertionError(step)
        self.check_exists(untagged, step)

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 2)
            except Exception:
                pass
            self.writer = None

    async def run(self, stop_at):
        await asyncio.sleep(self.args.ramp * self.cid / max(1, self.args.clients))
        rounds = [m for m, w in MIX for _ in range(w)]
        while time.monotonic() < stop_at:
            self.step = "connect"
            try:
                await self.open()
                while time.monotonic() < stop_at:
                    order = rounds[:]
                    self.rnd.shuffle(order)
                    # +FLAGS then -FLAGS of one message, as a pair.
                    order = [s for s in order if s != "store_del"]
                    for step in order:
                        self.step = step
                        t = time.perf_counter()
                        await self.one(step)
                        self.stats.lat[step].append(time.perf_counter() - t)
                        if step == "store_add":
                            self.step = "store_del"
                            t = time.perf_counter()
                            await self.one("store_del")
                            self.stats.lat["store_del"].append(time.perf_counter() - t)
                        if time.monotonic() >= stop_at:
                            break
                try:
                    await asyncio.wait_for(self.c.command("LOGOUT"), self.args.timeout)
                except Exception:
                    pass
            except ProtoError as e:
                self.stats.error(self.step, f"protocol: {e} (client {self.cid})")
            except (asyncio.TimeoutError, TimeoutError):
                self.stats.error(self.step, f"timeout after {self.args.timeout}s (client {self.cid})")
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
                self.stats.error(self.step, f"{type(e).__name__}: {e} (client {self.cid})")
            finally:
                await self.close()


def read_users(path):
    users = []
    with open(path) as f:
        for line in f:
            if line.strip():
                lg, pw = line.split()
                users.append((lg, pw))
    return users


async def worker_main(args, proc, stop_at):
    users = read_users(args.users)
    stats = LongStats()
    words = [w for w in args.words.split(",") if w]
    shared = args.clients > len(users)
    clients = [Client(cid, args, *users[cid % len(users)], shared, stats, words)
               for cid in range(args.clients) if cid % args.procs == proc]
    await asyncio.gather(*(c.run(stop_at) for c in clients))
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"lat": dict(stats.lat), "err": dict(stats.err), "samples": stats.samples,
            "flag_races": stats.flag_races, "cpu": ru.ru_utime + ru.ru_stime}


def run_worker(packed):
    args, proc, stop_at_wall = packed
    # monotonic clocks are per boot, shared by the processes; wall clock only to be safe
    stop_at = time.monotonic() + (stop_at_wall - time.time())
    return asyncio.run(worker_main(args, proc, stop_at))


async def run(args):
    start = time.monotonic()
    stop_wall = time.time() + args.duration
    if args.procs <= 1:
        args.procs = 1
        results = [await worker_main(args, 0, start + args.duration)]
    else:
        loop = asyncio.get_running_loop()
        with multiprocessing.get_context("fork").Pool(args.procs) as pool:
            results = await loop.run_in_executor(
                None, pool.map, run_worker, [(args, p, stop_wall) for p in range(args.procs)])
    elapsed = time.monotonic() - start
    lat, err, samples, races, cpu = defaultdict(list), defaultdict(int), [], 0, 0.0
    for r in results:
        for k, v in r["lat"].items():
            lat[k].extend(v)
        for k, v in r["err"].items():
            err[k] += v
        samples += r["samples"]
        races += r["flag_races"]
        cpu += r["cpu"]
    loop_steps = [m for m, _ in MIX]
    cmds = sum(len(lat[s]) for s in loop_steps)
    total_err = sum(err.values())
    label = f"{args.label}: " if args.label else ""
    print(f"{label}IMAP long sessions: {args.clients} clients x {args.duration:.0f} s, mode {args.mode}, "
          f"port {args.port}, {args.procs} client process(es); wall {elapsed:.1f} s")
    print(f"{label}commands/s: {cmds / elapsed:.1f} ({cmds} commands in the mix); errors: {total_err}; "
          f"flag races (shared logins): {races}; client CPU {cpu:.1f} s "
          f"({100 * cpu / elapsed:.0f}% of one core)")
    hdr = f"{'command':<12} {'ok':>7} {'err':>5} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print(hdr)
    print("-" * len(hdr))
    rows = {}
    for s in ORDER:
        xs = lat.get(s, [])
        if not xs and not err.get(s):
            continue
        row = {"ok": len(xs), "err": err.get(s, 0), "ops_per_s": len(xs) / elapsed,
               "p50_ms": pct(xs, 50) * 1000, "p99_ms": pct(xs, 99) * 1000,
               "max_ms": max(xs) * 1000 if xs else float("nan")}
        rows[s] = row
        print(f"{s:<12} {row['ok']:>7} {row['err']:>5} {row['ops_per_s']:>8.1f} {row['p50_ms']:>8.2f} "
              f"{row['p99_ms']:>8.2f} {row['max_ms']:>8.2f}")
    if samples:
        print("first errors:")
        for s in samples[:20]:
            print("  " + s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "clients": args.clients, "duration": args.duration,
                       "mode": args.mode, "elapsed": elapsed, "commands": cmds,
                       "commands_per_s": cmds / elapsed, "errors": total_err,
                       "flag_races": races, "client_cpu": cpu, "steps": rows,
                       "error_samples": samples[:20]}, f, indent=1)
    return 1 if total_err else 0
