#!/usr/bin/env python3
"""gen_messages.py — write N varied RFC 5322 messages (CRLF) into DIR as 0001.eml, ...

Deterministic for a seed. The mix: plain text, multipart/alternative (text + HTML),
multipart/mixed with one or two base64 attachments (2-40 KB), a forwarded message/rfc822,
encoded-word subjects and names. Every subject contains "[hold]" (the bench rule holds it)
and one word of WORDS, so SEARCH SUBJECT <word> always finds something.

Usage: gen_messages.py DIR [--count 300] [--rcpt bench@local.test] [--seed 1]
"""

import argparse
import base64
import os
import random

WORDS = ["invoice", "meeting", "report", "offer", "delivery", "password", "newsletter", "urgent"]
SENDERS = [("Mallory", "mallory@far.test"), ("Eve Spammer", "eve@evil.test"),
           ("=?utf-8?q?J=C3=BCrgen?=", "juergen@example.test"), ("", "noreply@shop.test"),
           ("Billing Dept", "billing@corp.test"), ("Trudy", "trudy@phish.test")]


def addr(name, a):
    return f"{name} <{a}>" if name else a


def text_lines(rnd, n):
    return "".join(f"line {i} of the message, {rnd.choice(WORDS)} and some filler text here\r\n"
                   for i in range(n))


def make(n, rnd, rcpt):
    name, frm = SENDERS[n % len(SENDERS)]
    word = WORDS[n % len(WORDS)]
    subject = f"[hold] {word} #{n}" if n % 5 else f"[hold] =?utf-8?q?Caf=C3=A9_{word}?= #{n}"
    head = (f"From: {addr(name, frm)}\r\nTo: {rcpt}\r\n"
            + (f"Cc: Team: a@corp.test, b@corp.test;\r\n" if n % 9 == 0 else "")
            + f"Subject: {subject}\r\nDate: Fri, 27 Nov 2026 {n % 24:02d}:{n % 60:02d}:00 +0100\r\n"
            f"Message-ID: <bench-{n}@far.test>\r\nMIME-Version: 1.0\r\n")
    kind = n % 4
    if kind == 0:
        return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n"
                + text_lines(rnd, 5 + n % 40)).encode()
    if kind == 1:
        return (head + 'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
                "--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text_lines(rnd, 10)
                + "--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>"
                + text_lines(rnd, 10).replace("\r\n", "</p>\r\n<p>") + "</p></body></html>\r\n"
                "--alt--\r\n").encode()
    if kind == 2:
        parts = ["--mix\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" + text_lines(rnd, 8)]
        for k in range(1 + n % 2):
            blob = base64.encodebytes(rnd.randbytes(2000 + (n * 997) % 30000)).decode()
            blob = blob.replace("\n", "\r\n")
            fname = f"doc{n}-{k}.pdf" if k == 0 else f"img{n}.png"
            ctype = "application/pdf" if k == 0 else "image/png"
            parts.append(f"--mix\r\nContent-Type: {ctype}; name=\"{fname}\"\r\n"
                         f"Content-Disposition: attachment; filename=\"{fname}\"\r\n"
                         f"Content-Transfer-Encoding: base64\r\n\r\n{blob}")
        return (head + 'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
                + "".join(parts) + "--mix--\r\n").encode()
    inner = (f"From: Bob <bob@inner.test>\r\nTo: {rcpt}\r\nSubject: inner {word}\r\n"
             "Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nContent-Type: text/plain\r\n\r\n"
             + text_lines(rnd, 6))
    return (head + 'Content-Type: multipart/mixed; boundary="fwd"\r\n\r\n'
            "--fwd\r\nContent-Type: text/plain\r\n\r\nSee the forwarded message.\r\n"
            "--fwd\r\nContent-Type: message/rfc822\r\n\r\n" + inner + "--fwd--\r\n").encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--rcpt", default="bench@local.test")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    rnd = random.Random(a.seed)
    for n in range(1, a.count + 1):
        with open(os.path.join(a.dir, f"{n:04d}.eml"), "wb") as f:
            f.write(make(n, rnd, a.rcpt))


if __name__ == "__main__":
    main()
