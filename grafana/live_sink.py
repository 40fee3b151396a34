#!/usr/bin/env python3
"""A tiny SMTP server on loopback for grafana/live.sh (stdlib only): postern's delivery target.

Why: the live check needs deliveries that succeed, one that fails for good (so
postern makes a DSN and `postern_bounces_total` moves) and one that fails for
now (a deferred message, so the queue and its oldest-age gauge are non-zero).
A Maildir route cannot refuse a recipient; this sink can:

  RCPT TO:<bounce@...>  550 5.1.1 (permanent: a DSN to the sender)
  RCPT TO:<defer@...>   451 4.3.0 (temporary: the message waits for its retry)
  anything else         250, message counted and dropped

No STARTTLS, no PIPELINING (postern then speaks one command at a time).
Listens on --host:--port until SIGTERM; prints what it received on exit (stderr).
"""
import argparse
import signal
import socketserver
import sys
import threading

STATS = {"messages": 0, "rcpt_ok": 0, "rcpt_550": 0, "rcpt_451": 0}
LOCK = threading.Lock()


def count(key):
    with LOCK:
        STATS[key] += 1


class Session(socketserver.StreamRequestHandler):
    timeout = 60

    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        self.reply("220 sink.live-check.test ESMTP live_sink")
        rcpts = []
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            cmd = line.decode("latin-1").strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250-sink.live-check.test\r\n250-8BITMIME\r\n250 SIZE 52428800")
            elif verb == "MAIL":
                rcpts = []
                self.reply("250 2.1.0 ok")
            elif verb == "RCPT":
                addr = cmd.split(":", 1)[-1].strip().strip("<>").lower()
                if addr.startswith("bounce@"):
                    count("rcpt_550")
                    self.reply("550 5.1.1 <%s>: no such user here" % addr)
                elif addr.startswith("defer@"):
                    count("rcpt_451")
                    self.reply("451 4.3.0 <%s>: try again later" % addr)
                else:
                    count("rcpt_ok")
                    rcpts.append(addr)
                    self.reply("250 2.1.5 ok")
            elif verb == "DATA":
                if not rcpts:
                    self.reply("554 5.5.1 no valid recipients")
                    continue
                self.reply("354 go ahead")
                while True:
                    d = self.rfile.readline(1 << 20)
                    if not d or d in (b".\r\n", b".\n"):
                        break
                if not d:
                    return
                count("messages")
                self.reply("250 2.0.0 ok: delivered")
            elif verb == "RSET":
                rcpts = []
                self.reply("250 2.0.0 ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("502 5.5.2 not implemented")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    srv = Server((a.host, a.port), Session)

    def stop(*_):
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    srv.serve_forever()
    print("live_sink:", " ".join(f"{k}={v}" for k, v in STATS.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
