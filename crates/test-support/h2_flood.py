#!/usr/bin/python3
"""A raw HTTP/2 client that opens gRPC streams and never sends their bodies.

Used by tests/hot_path_isolation.rs (Debian's python3-h2). For each of
--connections connections it reads the server's SETTINGS, opens up to --streams
streams on PATH (headers only: no DATA, no END_STREAM), as many as the server's
SETTINGS_MAX_CONCURRENT_STREAMS allows, then confirms with a PING that the
server has read them. It then prints one JSON line:

    {"max_concurrent_streams": N or null, "opened": N}

and keeps the connections alive (answering PINGs) until its standard input
closes (or, with --until-answered SECS, until every stream is answered or reset,
at most SECS), when it prints a second line with what the server did to the
streams (statuses: how many ended with each grpc-status):

    {"reset": N, "answered": N, "statuses": {"4": N}, "closed_connections": N}
"""

import time

import argparse
import json
import select
import socket
import sys

import h2.config
import h2.connection
import h2.events
import h2.settings


def read_events(sock, conn):
    data = sock.recv(65535)
    if not data:
        return None
    events = conn.receive_data(data)
    sock.sendall(conn.data_to_send())
    return events


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("--streams", type=int, default=1100)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--token")
    parser.add_argument("--until-answered", type=float)
    parser.add_argument("--source", help="local address to connect from (e.g. 127.0.0.2)")
    args = parser.parse_args()

    conns = []
    advertised = None
    opened = 0
    for _ in range(args.connections):
        source = (args.source, 0) if args.source else None
        sock = socket.create_connection((args.host, args.port), timeout=10, source_address=source)
        conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        # The server's first frame is its SETTINGS.
        settings = None
        while settings is None:
            events = read_events(sock, conn)
            if events is None:
                sys.exit("the server closed the connection before its SETTINGS")
            for event in events:
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = event.changed_settings
        limit = settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
        advertised = limit.new_value if limit is not None else None
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", args.path),
            (":authority", f"{args.host}:{args.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if args.token:
            headers.append(("authorization", f"Bearer {args.token}"))
        for _ in range(args.streams):
            if advertised is not None and conn.open_outbound_streams >= advertised:
                break
            conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=False)
            opened += 1
        # A PING answered after the HEADERS: the server has read them all.
        conn.ping(b"flooded!")
        sock.sendall(conn.data_to_send())
        acked = False
        while not acked:
            events = read_events(sock, conn)
            if events is None:
                sys.exit("the server closed the connection during the flood")
            acked = any(isinstance(e, h2.events.PingAckReceived) for e in events)
        sock.settimeout(None)
        conns.append((sock, conn))

    print(json.dumps({"max_concurrent_streams": advertised, "opened": opened}), flush=True)

    reset = answered = closed = 0
    statuses = {}
    # Streams answered or reset (an answered stream is often reset after, as
    # its request never ended).
    ended = set()
    open_socks = {sock: conn for sock, conn in conns}
    until = args.until_answered and time.monotonic() + args.until_answered
    while True:
        if until and (len(ended) >= opened or time.monotonic() > until):
            break
        timeout = max(0.01, until - time.monotonic()) if until else None
        readable, _, _ = select.select([sys.stdin, *open_socks], [], [], timeout)
        if sys.stdin in readable and not sys.stdin.readline():
            break
        for sock in [s for s in readable if s is not sys.stdin]:
            try:
                events = read_events(sock, open_socks[sock])
            except OSError:
                events = None
            if events is None:
                closed += 1
                del open_socks[sock]
                continue
            for event in events:
                if isinstance(event, h2.events.StreamReset):
                    reset += 1
                    ended.add((sock.fileno(), event.stream_id))
                elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    status = dict(event.headers).get("grpc-status")
                    if status is not None:
                        # Trailers-only answers carry it in the response headers.
                        answered += 1
                        statuses[status] = statuses.get(status, 0) + 1
                        ended.add((sock.fileno(), event.stream_id))
    report = {"reset": reset, "answered": answered, "statuses": statuses, "closed_connections": closed}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
