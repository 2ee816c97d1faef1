#!/usr/bin/env python3
"""A TCP proxy that shapes, counts or stalls traffic, to test and benchmark a remote endpoint.

    python scripts/tcp_proxy.py --listen 127.0.0.1:9001 --target 127.0.0.1:9000 \
        [--delay-ms N] [--bandwidth-mbps B] [--control 127.0.0.1:9002] [--stall]

``--delay-ms N`` holds the first bytes of every request for N ms: a request is the
client's bytes after a response (or the first bytes of a connection), so each HTTP
request of a keep-alive connection pays the latency once, like the first-byte latency
of an object store. ``--bandwidth-mbps B`` paces what the server sends on each
connection to B MB/s (10^6 bytes per second), like the per-connection throughput of
S3: a client gets more only with more connections. ``--control HOST:PORT`` answers
every connection with one JSON line of counters (connections, requests, bytes each
way) and closes it. ``--stall`` accepts connections and never answers (nor forwards
anything), like an endpoint that hangs. SIGUSR1 toggles stalling while running:
connections already open stop (or resume) forwarding too. SIGTERM or SIGINT stops
the proxy. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time

_CHUNK = 1 << 18
_PACE_CHUNK = 1 << 16  # paced writes are small enough that a connection's rate stays smooth


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


class Proxy:
    """Forwards connections from the listening address to the target."""

    def __init__(self, target: tuple[str, int], delay: float, stall: bool, bandwidth: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self.bandwidth = bandwidth
        """Bytes per second per connection, server to client; 0: unlimited."""
        self.flowing = asyncio.Event()
        if not stall:
            self.flowing.set()
        self.counters = {"connections": 0, "requests": 0, "bytes_up": 0, "bytes_down": 0}

    def toggle_stall(self) -> None:
        if self.flowing.is_set():
            self.flowing.clear()
            print("tcp_proxy: stalling", file=sys.stderr, flush=True)
        else:
            self.flowing.set()
            print("tcp_proxy: forwarding", file=sys.stderr, flush=True)

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_writer = None
        try:
            await self.flowing.wait()  # a stalled endpoint accepts, then says nothing
            server_reader, server_writer = await asyncio.open_connection(*self.target)
            self.counters["connections"] += 1
            turn = [True]  # whether the next client bytes start a new request
            await asyncio.gather(
                self._pump(client_reader, server_writer, turn, upstream=True),
                self._pump(server_reader, client_writer, turn, upstream=False),
                return_exceptions=True,
            )
        except OSError:
            pass
        finally:
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turn: list[bool], upstream: bool
    ) -> None:
        paced = not upstream and self.bandwidth > 0
        due = 0.0  # when the bytes written so far may have left, at the connection's rate
        try:
            while data := await reader.read(_PACE_CHUNK if paced else _CHUNK):
                await self.flowing.wait()
                if upstream:
                    if turn[0]:
                        self.counters["requests"] += 1
                        if self.delay:
                            await asyncio.sleep(self.delay)
                    turn[0] = False
                    self.counters["bytes_up"] += len(data)
                else:
                    turn[0] = True
                    self.counters["bytes_down"] += len(data)
                if paced:
                    now = time.monotonic()
                    due = max(due, now) + len(data) / self.bandwidth
                    if due - now > 0.001:
                        await asyncio.sleep(due - now)
                writer.write(data)
                await writer.drain()
        finally:
            # One side closed: close the other so that the peer sees it.
            writer.close()


async def _main(args: argparse.Namespace) -> None:
    proxy = Proxy(args.target, args.delay_ms / 1000.0, args.stall, args.bandwidth_mbps * 1e6)
    host, port = args.listen
    connections: set[asyncio.Task] = set()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(proxy.handle(reader, writer))
        connections.add(task)
        task.add_done_callback(connections.discard)

    server = await asyncio.start_server(accept, host, port, reuse_address=True)
    if args.control is not None:

        async def report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(json.dumps(proxy.counters).encode() + b"\n")
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()

        await asyncio.start_server(report, *args.control, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.toggle_stall)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"tcp_proxy: {host}:{port} -> {args.target[0]}:{args.target[1]}, "
        f"delay {args.delay_ms} ms, bandwidth {args.bandwidth_mbps or 'unlimited'} MB/s per connection"
        f"{', stalling' if args.stall else ''}",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    server.close()
    for task in list(connections):  # stalled connections would keep the server open
        task.cancel()
    await asyncio.gather(*connections, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--target", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency added to each request")
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0,
                        help="MB/s per connection from the server (default: unlimited)")
    parser.add_argument("--control", type=_address, metavar="HOST:PORT", help="answer counters as JSON here")
    parser.add_argument("--stall", action="store_true", help="accept connections, never answer")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.bandwidth_mbps < 0:
        parser.error("--delay-ms and --bandwidth-mbps must not be negative")
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
