#!/usr/bin/env python3
"""A loopback DNS responder that answers every query NXDOMAIN, at once (stdlib only).

Why: postern's SPF/DKIM/DMARC checks wait up to `[checks] deadline` (20 s by
default) when the configured nameserver does not answer; a nameserver on the
discard port (127.0.0.1:9) never answers, so every message would wait 20 s.
This stub gives the checks a real, immediate answer ("no such domain": SPF
none, DMARC none), so a benchmark measures the gateway with its checks on and
no DNS latency. The reply carries an SOA in the authority section (negative
TTL --ttl), so a caching resolver may keep the answer.

Listens on UDP and TCP at --host:--port. Stops on SIGTERM/SIGINT. Prints the
number of queries answered on exit (stderr).
"""
import argparse
import asyncio
import signal
import struct
import sys

COUNT = 0


def name_end(msg, off):
    """Offset just past the (uncompressed) QNAME starting at off."""
    while off < len(msg):
        n = msg[off]
        if n == 0:
            return off + 1
        if n & 0xC0:
            return off + 2
        off += 1 + n
    raise ValueError("truncated name")


def answer(query, ttl):
    global COUNT
    if len(query) < 12:
        return None
    qid, flags, qd = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qd < 1:        # a response, or no question
        return None
    end = name_end(query, 12) + 4        # QNAME + QTYPE + QCLASS
    question = query[12:end]
    rd = flags & 0x0100
    opcode = flags & 0x7800
    rcode = 3 if opcode == 0 else 4      # NXDOMAIN, or NOTIMP for other opcodes
    hdr = struct.pack("!HHHHHH", qid, 0x8000 | opcode | 0x0400 | rd | 0x0080 | rcode, 1, 0, 1 if rcode == 3 else 0, 0)
    auth = b""
    if rcode == 3:
        # root SOA: . SOA ns.invalid. hostmaster.invalid. 1 3600 600 86400 TTL
        rdata = b"\x02ns\x07invalid\x00" + b"\x0ahostmaster\x07invalid\x00" + struct.pack("!IIIII", 1, 3600, 600, 86400, ttl)
        auth = b"\x00" + struct.pack("!HHIH", 6, 1, ttl, len(rdata)) + rdata
    COUNT += 1
    return hdr + question + auth


class Udp(asyncio.DatagramProtocol):
    def __init__(self, ttl):
        self.ttl = ttl

    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        try:
            r = answer(data, self.ttl)
        except (ValueError, struct.error):
            return
        if r:
            self.t.sendto(r, addr)


async def tcp_client(reader, writer, ttl):
    try:
        while True:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
            r = answer(await reader.readexactly(n), ttl)
            if not r:
                break
            writer.write(struct.pack("!H", len(r)) + r)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, struct.error):
        pass
    finally:
        writer.close()


async def main(a):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, lambda: stop.done() or stop.set_result(None))
    udp, _ = await loop.create_datagram_endpoint(lambda: Udp(a.ttl), local_addr=(a.host, a.port))
    tcp = await asyncio.start_server(lambda r, w: tcp_client(r, w, a.ttl), a.host, a.port)
    await stop
    udp.close()
    tcp.close()
    print(f"dns_stub: answered {COUNT} queries", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5353)
    p.add_argument("--ttl", type=int, default=300, help="negative-caching TTL in the SOA")
    asyncio.run(main(p.parse_args()))
