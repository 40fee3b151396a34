"""What the bench/ scripts share: free loopback ports, a process's RSS, and
reading one SMTP reply (stdlib only)."""
import asyncio
import socket


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid):
    """VmRSS of pid in KiB (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def smtp_reply(r, timeout=15, closed=None):
    """One SMTP reply (all its lines) as text. When the peer closes: `closed`
    if given (e.g. "(closed)"), else ConnectionError."""
    out = b""
    while True:
        line = await asyncio.wait_for(r.readline(), timeout)
        if not line:
            if closed is None:
                raise ConnectionError("closed")
            return out.decode("latin1") or closed
        out += line
        if line[3:4] != b"-":
            return out.decode("latin1")
