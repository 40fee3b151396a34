#!/usr/bin/env python3
"""Mail and mailbox traffic for grafana/live.sh (stdlib only), then a check that the counters moved.

Why: every dashboard panel must show data from a gateway that has really
worked, so this drives one of each thing the panels chart, through the real
binary over real sockets, as the outside world would:

  SMTP from 127.0.0.2 (outside [relay] networks, so SPF/DKIM/DMARC run):
    accepted + delivered, rejected by a rule, relay refused (RCPT to a foreign
    domain), quarantined, rate-limited (450 at MAIL), a rule error (451), a
    recipient the delivery sink refuses for good (550: a DSN, a bounce), one it
    defers (451: the message waits in the queue), one session over STARTTLS
  SMTP from 127.0.0.1 (trusted): relayed to a foreign domain (outbound)
  submission and submissions (implicit TLS): a connection each (EHLO, QUIT)
  POP3 (STLS) and IMAP (STARTTLS): one failed and one good login each;
    IMAP `UID MOVE` of a held message into Release (a release via imap)
  `postern quarantine release ID` while serve runs (a release via cli)
  SIGHUP to postern (a good reload)

Then it reads /metrics until every expected counter moved (or 30 s pass) and
prints them. A family the binary does not export is reported and skipped; one
it exports that did not move is an error (exit 1).

Usage: live_traffic.py --postern BIN --config FILE --pid PID --smtp P --submission P
       --submissions P --pop3 P --imap P --metrics P --password PW
"""
import argparse
import imaplib
import os
import poplib
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.request

OUTSIDE = ("127.0.0.2", 0)   # not in [relay] networks: an outside client
TLS = ssl._create_unverified_context()   # the gateway's generated self-signed certificate
LOGIN = "alice@example.test"


def log(*a):
    print("[live]", *a, file=sys.stderr, flush=True)


def smtp(port, sender, rcpts, subject, source=OUTSIDE, starttls=False):
    """One SMTP transaction; returns the outcome as a short word (250, 450, rcpt 550, ...)."""
    msg = (f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: {subject}\r\n"
           f"Message-ID: <{time.time_ns()}@far.test>\r\n\r\nlive check\r\n")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source) as s:
            if starttls:
                s.starttls(context=TLS)
            s.sendmail(sender, rcpts, msg)
        return "250"
    except smtplib.SMTPRecipientsRefused as e:
        return "rcpt " + str(list(e.recipients.values())[0][0])
    except smtplib.SMTPResponseException as e:
        return str(e.smtp_code)
    except (OSError, smtplib.SMTPException) as e:
        return type(e).__name__


def mail(a):
    out = {}
    p = a.smtp
    out["accepted"] = [smtp(p, f"sender{i}@far.test", [f"{u}@example.test"], "live-check ok")
                       for i, u in enumerate(["alice", "bob", "carol", "alice", "bob", "carol"])]
    out["rule reject"] = [smtp(p, "spam@far.test", ["alice@example.test"], "live-check reject")]
    out["relay refused"] = [smtp(p, "relay@far.test", ["someone@foreign.test"], "live-check relay")]
    out["quarantined"] = [smtp(p, f"q{i}@far.test", [r], "live-check quarantine")
                          for i, r in enumerate(["alice@example.test", "alice@example.test", "bob@example.test"])]
    out["rate-limited"] = [smtp(p, "flood@far.test", ["bob@example.test"], "live-check flood") for _ in range(4)]
    out["rule error"] = [smtp(p, "boom@far.test", ["carol@example.test"], "live-check boom")]
    # From outside, the backend's 550/451 for these would come at RCPT time
    # ([relay] verify_recipients); a trusted client's mail is not verified, so
    # the refusal comes at delivery: a bounce, and a deferral.
    out["unknown user refused at rcpt"] = [smtp(p, "bounced@far.test", ["bounce@example.test"], "live-check unknown")]
    out["bounce"] = [smtp(p, "app@example.test", ["bounce@example.test"], "live-check bounce", source=("127.0.0.1", 0))]
    out["deferred"] = [smtp(p, "app@example.test", ["defer@example.test"], "live-check defer", source=("127.0.0.1", 0))]
    out["starttls"] = [smtp(p, "tls@far.test", ["alice@example.test"], "live-check tls", starttls=True)]
    out["trusted outbound"] = [smtp(p, "app@example.test", ["someone@foreign.test"], "live-check outbound",
                                    source=("127.0.0.1", 0))]
    for name, port, ssl_ in (("submission", a.submission, False), ("submissions", a.submissions, True)):
        try:
            cls = smtplib.SMTP_SSL if ssl_ else smtplib.SMTP
            kw = {"context": TLS} if ssl_ else {}
            with cls("127.0.0.1", port, timeout=30, source_address=OUTSIDE, **kw) as s:
                s.ehlo("client.far.test")
            out[name] = ["connected"]
        except (OSError, smtplib.SMTPException) as e:
            out[name] = [type(e).__name__]
    for k, v in out.items():
        log(f"smtp {k}: {' '.join(v)}")
    return out


def pop3(a):
    res = []
    for pw in ("wrong-password", a.password):
        try:
            c = poplib.POP3("127.0.0.1", a.pop3, timeout=30)
            c.stls(context=TLS)
            c.user(LOGIN)
            try:
                c.pass_(pw)
                res.append("ok(%d held)" % c.stat()[0])
            except poplib.error_proto as e:
                res.append("refused " + e.args[0].decode(errors="replace")[:40])
            c.quit()
        except (OSError, poplib.error_proto) as e:
            res.append(type(e).__name__ + " " + str(e)[:60])
    log("pop3 logins:", " | ".join(res))


def imap(a):
    res = []
    for pw in ("wrong-password", a.password):
        try:
            c = imaplib.IMAP4("127.0.0.1", a.imap, timeout=30)
            c.starttls(ssl_context=TLS)
            try:
                c.login(LOGIN, pw)
            except imaplib.IMAP4.error as e:
                res.append("refused " + str(e)[:40])
                c.logout()
                continue
            c.select("INBOX")
            typ, data = c.uid("SEARCH", "ALL")
            uids = data[0].split() if typ == "OK" and data and data[0] else []
            if uids:
                typ, data = c.uid("MOVE", uids[0].decode(), "Release")
                res.append(f"ok, UID MOVE {uids[0].decode()} Release: {typ}")
            else:
                res.append("ok, but INBOX is empty (nothing to release)")
            c.logout()
        except (OSError, imaplib.IMAP4.error) as e:
            res.append(type(e).__name__ + " " + str(e)[:60])
    log("imap logins:", " | ".join(res))


def cli_release(a):
    run = lambda *args: subprocess.run([a.postern, *args, "--config", a.config],
                                       capture_output=True, text=True, timeout=30)
    lst = run("quarantine", "list", "--rcpt", "bob@example.test")
    ids = re.findall(r"^([0-9A-Fa-f]{8,})\s", lst.stdout, re.M)
    if not ids:
        log("cli release: no held message for bob in `quarantine list`:", lst.stdout.strip(), lst.stderr.strip())
        return
    r = run("quarantine", "release", ids[0])
    log(f"cli release {ids[0]}: rc={r.returncode} {(r.stdout + r.stderr).strip()}")


def scrape(port):
    """{(name, frozenset(labels)): value} from postern's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if m and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


# (what, metric, label filter, at least): what the traffic above must have moved.
EXPECT = [
    ("messages received", "postern_messages_received_total", {}, 10),
    ("SMTP connections", "postern_smtp_connections_total", {}, 20),
    ("TLS sessions (STARTTLS + 465)", "postern_smtp_tls_sessions_total", {}, 2),
    ("verdict reject (rule, relay)", "postern_verdicts_total", {"verdict": "reject"}, 2),
    ("verdict quarantine", "postern_verdicts_total", {"verdict": "quarantine"}, 3),
    ("verdict tempfail", "postern_verdicts_total", {"verdict": "tempfail"}, 1),
    ("rate-limited", "postern_ratelimited_total", {}, 2),
    ("SPF results", "postern_auth_results_total", {"method": "spf"}, 1),
    ("DMARC results", "postern_auth_results_total", {"method": "dmarc"}, 1),
    ("rule errors", "postern_rule_errors_total", {}, 1),
    ("rule verdicts: error", "postern_rule_verdicts_total", {"verdict": "error"}, 1),
    ("rule verdicts: quarantine", "postern_rule_verdicts_total", {"verdict": "quarantine"}, 3),
    ("rule verdicts: reject", "postern_rule_verdicts_total", {"verdict": "reject"}, 1),
    ("rule time observations", "postern_rule_seconds_count", {}, 1),
    ("deliveries ok", "postern_delivery_attempts_total", {"result": "ok"}, 8),
    ("deliveries permfail", "postern_delivery_attempts_total", {"result": "permfail"}, 1),
    ("deliveries tempfail", "postern_delivery_attempts_total", {"result": "tempfail"}, 1),
    ("bounces (DSN)", "postern_bounces_total", {}, 1),
    ("queue: deferred", "postern_queue_messages", {"state": "deferred"}, 1),
    ("queue: oldest age > 0 s", "postern_queue_oldest_age_seconds", {}, 0.001),
    ("quarantine held", "postern_quarantine_messages", {}, 1),
    ("pop3 login ok", "postern_mailbox_logins_total", {"protocol": "pop3", "result": "ok"}, 1),
    ("pop3 login fail", "postern_mailbox_logins_total", {"protocol": "pop3", "result": "fail"}, 1),
    ("imap login ok", "postern_mailbox_logins_total", {"protocol": "imap", "result": "ok"}, 1),
    ("imap login fail", "postern_mailbox_logins_total", {"protocol": "imap", "result": "fail"}, 1),
    ("release via imap", "postern_releases_total", {"via": "imap"}, 1),
    ("release via cli", "postern_releases_total", {"via": "cli"}, 1),
    ("reload ok", "postern_config_reloads_total", {"result": "ok"}, 1),
    ("build info", "postern_build_info", {}, 1),
    ("rate-limit backend up", "postern_ratelimit_backend_up", {}, 1),
]


def check(port, deadline_s=30):
    """Wait until every expectation holds (or the deadline); returns (failures, lines)."""
    end = time.monotonic() + deadline_s
    while True:
        m = scrape(port)
        families = {n for n, _ in m}
        lines, bad = [], []
        for what, name, want, least in EXPECT:
            if name not in families:
                lines.append(f"  {what:32} {name}: not exported by this binary (skipped)")
                continue
            v = sum(val for (n, labs), val in m.items()
                    if n == name and all((k, x) in labs for k, x in want.items()))
            ok = v >= least
            lines.append(f"  {what:32} {name}{want or ''} = {v:g}{'' if ok else f'   (want >= {least:g})'}")
            if not ok:
                bad.append(what)
        if not bad or time.monotonic() > end:
            return bad, lines
        time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser()
    for k in ("postern", "config", "password"):
        ap.add_argument("--" + k, required=True)
    for k in ("pid", "smtp", "submission", "submissions", "pop3", "imap", "metrics"):
        ap.add_argument("--" + k, type=int, required=True)
    a = ap.parse_args()
    t0 = time.monotonic()
    mail(a)
    pop3(a)
    imap(a)
    cli_release(a)
    os.kill(a.pid, signal.SIGHUP)
    log("SIGHUP sent to postern (reload)")
    bad, lines = check(a.metrics)
    log(f"traffic done in {time.monotonic() - t0:.1f} s; postern's counters:")
    print("\n".join(lines), file=sys.stderr)
    if bad:
        log("ERROR: these did not move:", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
