#!/usr/bin/env python3
"""Final-dot -> reply latency of EVERY message in a packet capture (stdlib only).

Input: a classic pcap file written by `tcpdump -i lo -s 96 -w FILE tcp port PORT`
(only the first bytes of each payload are needed). For each TCP connection to
PORT, after the server's "354" reply, the client's data segments follow; the
first server segment after them is the reply to the end of DATA. Its latency is

    timestamp(server's reply segment) - timestamp(client's last data segment)

where the last data segment carries the final "<CRLF>.<CRLF>". Both timestamps
are the kernel's capture times on the loopback interface, so this is the
gateway's own time from the last byte in to the reply out (plus loopback and
scheduling), free of any client-side delay, for every message, not a sample.

Output: one JSON object: messages, replies by code, percentiles (ms, nearest rank).
"""
import collections
import json
import math
import struct
import sys


def packets(path):
    with open(path, "rb") as f:
        gh = f.read(24)
        magic = gh[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            e = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            e = ">"
        else:
            raise SystemExit(f"{path}: not a classic pcap file (use tcpdump -w)")
        nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
        linktype = struct.unpack(e + "I", gh[20:24])[0]
        skip = {0: 4, 1: 14, 113: 16, 276: 20, 101: 0, 12: 0}.get(linktype)
        if skip is None:
            raise SystemExit(f"unsupported link type {linktype}")
        div = 1e9 if nano else 1e6
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            sec, frac, incl, _orig = struct.unpack(e + "IIII", h)
            data = f.read(incl)
            yield sec + frac / div, data[skip:]


def main(path, port):
    # per flow (client port): state, time of the client's last data segment
    state = {}
    lat, codes = [], collections.Counter()
    for ts, ip in packets(path):
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 15) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:]
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        doff = (tcp[12] >> 4) * 4
        paylen = total - ihl - doff          # real payload length, even when the capture is cut
        if paylen <= 0:
            continue
        payload = tcp[doff:]
        if sport == port:                    # server -> client
            flow = dport
            st = state.get(flow)
            if payload[:3] == b"354":
                state[flow] = ["data", None]
            elif st and st[0] == "data" and st[1] is not None:
                lat.append(ts - st[1])
                codes[payload[:3].decode("ascii", "replace")] += 1
                state[flow] = ["idle", None]
        elif dport == port:                  # client -> server
            st = state.get(sport)
            if st and st[0] == "data":
                st[1] = ts
    lat_ms = sorted(x * 1000 for x in lat)

    def pct(p):
        if not lat_ms:
            return None
        return round(lat_ms[max(1, math.ceil(p / 100 * len(lat_ms))) - 1], 3)

    print(json.dumps({
        "method": "tcpdump on lo, every message: server reply after DATA - client's last data segment",
        "messages": len(lat_ms),
        "replies": dict(codes),
        "dot_to_reply_ms": {k: pct(q) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100))},
    }))
    return 0 if lat_ms else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
