#!/usr/bin/env python3
"""flag_lost_update.py — two IMAP sessions of one login, INBOX selected in both (a phone and a
desktop). Session A changes a flag, then session B (whose SELECT predates A's change) changes
another flag of the same message. A third, fresh session reads the flags. RFC 3501 STORE
+FLAGS/-FLAGS adds/removes only the given flags, so A's flag must survive B's STORE.

Scenarios (message 1 each time; flags cleared first):
  flag-then-answer: A STORE +FLAGS (\\Flagged); B STORE +FLAGS (\\Answered)   -> want \\Answered \\Flagged
  seen-then-flag:   A FETCH BODY[] (sets \\Seen); B STORE +FLAGS (\\Flagged)  -> want \\Seen \\Flagged
  delete-then-flag: A STORE +FLAGS (\\Deleted); B STORE +FLAGS (\\Flagged)    -> want \\Flagged \\Deleted

Usage: flag_lost_update.py PORT LOGIN PASSWORD   (STARTTLS port; the login needs >= 1 held message)
Prints the dialogue; exit 1 if a flag was lost.
"""
import socket
import ssl
import sys

port, login, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE


class Session:
    def __init__(self, name):
        self.name, self.n = name, 0
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.s.makefile("rb")
        self.f.readline()
        self.cmd("STARTTLS", quiet=True)
        self.s = ctx.wrap_socket(self.s)
        self.f = self.s.makefile("rb")
        self.cmd(f'LOGIN "{login}" "{password}"', quiet=True)
        self.cmd("SELECT INBOX", quiet=True)

    def cmd(self, text, quiet=False):
        self.n += 1
        tag = f"{self.name}{self.n}"
        self.s.sendall(f"{tag} {text}\r\n".encode())
        out = []
        while True:
            line = self.f.readline()
            if not line:
                raise SystemExit(f"{self.name}: connection closed")
            if line.rstrip().endswith(b"}"):          # a literal: read it, show its size only
                n = int(line.rstrip()[line.rstrip().rindex(b"{") + 1:-1])
                self.f.read(n)
                line = line.rstrip() + b" <%d octets>...\r\n" % n
            out.append(line.decode(errors="replace").rstrip())
            if line.startswith(tag.encode() + b" "):
                break
        if not quiet:
            print(f"  {self.name} C: {tag} {text}")
            for line in out:
                print(f"  {self.name} S: {line}")
        return out

    def close(self):
        try:
            self.cmd("LOGOUT", quiet=True)
        except Exception:
            pass
        self.s.close()


def flags_now():
    c = Session("C")
    out = c.cmd("FETCH 1 (FLAGS)")
    c.close()
    line = next(x for x in out if x.startswith("* 1 FETCH"))
    return line[line.index("FLAGS (") + 7:line.index(")", line.index("FLAGS ("))].split()


lost = 0
for name, a_cmd, b_cmd, want in (
    ("flag-then-answer", "STORE 1 +FLAGS (\\Flagged)", "STORE 1 +FLAGS (\\Answered)", {"\\Answered", "\\Flagged"}),
    ("seen-then-flag", "FETCH 1 BODY[]", "STORE 1 +FLAGS (\\Flagged)", {"\\Seen", "\\Flagged"}),
    ("delete-then-flag", "STORE 1 +FLAGS (\\Deleted)", "STORE 1 +FLAGS (\\Flagged)", {"\\Flagged", "\\Deleted"}),
):
    z = Session("Z")
    z.cmd("STORE 1 FLAGS ()", quiet=True)
    z.close()
    a, b = Session("A"), Session("B")
    print(f"{name}:")
    a.cmd(a_cmd)
    b.cmd(b_cmd)
    got = set(flags_now())
    print(f"  C: FETCH 1 (FLAGS) in a fresh session -> {' '.join(sorted(got)) or '(none)'}")
    if got != want:
        lost += 1
        print(f"  LOST UPDATE: want {' '.join(sorted(want))}")
    else:
        print("  ok")
    a.close()
    b.close()
z = Session("Z")
z.cmd("STORE 1 FLAGS ()", quiet=True)
z.close()
sys.exit(1 if lost else 0)
