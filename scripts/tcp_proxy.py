#!/usr/bin/env python3
"""A TCP proxy that adds latency or stalls, to test and benchmark a remote endpoint.

    python scripts/tcp_proxy.py --listen 127.0.0.1:9001 --target 127.0.0.1:9000 [--delay-ms N] [--stall]

``--delay-ms N`` holds the first bytes of every request for N ms: a request is the
client's bytes after a response (or the first bytes of a connection), so each HTTP
request of a keep-alive connection pays the latency once, like a round trip to a
distant endpoint. ``--stall`` accepts connections and never answers (nor forwards
anything), like an endpoint that hangs. SIGUSR1 toggles stalling while running:
connections already open stop (or resume) forwarding too. SIGTERM or SIGINT stops
the proxy. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

_CHUNK = 1 << 16


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


class Proxy:
    """Forwards connections from the listening address to the target."""

    def __init__(self, target: tuple[str, int], delay: float, stall: bool) -> None:
        self.target = target
        self.delay = delay
        self.flowing = asyncio.Event()
        if not stall:
            self.flowing.set()

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
        try:
            while data := await reader.read(_CHUNK):
                await self.flowing.wait()
                if upstream:
                    if turn[0] and self.delay:
                        await asyncio.sleep(self.delay)
                    turn[0] = False
                else:
                    turn[0] = True
                writer.write(data)
                await writer.drain()
        finally:
            # One side closed: close the other so that the peer sees it.
            writer.close()


async def _main(args: argparse.Namespace) -> None:
    proxy = Proxy(args.target, args.delay_ms / 1000.0, args.stall)
    host, port = args.listen
    connections: set[asyncio.Task] = set()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(proxy.handle(reader, writer))
        connections.add(task)
        task.add_done_callback(connections.discard)

    server = await asyncio.start_server(accept, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.toggle_stall)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"tcp_proxy: {host}:{port} -> {args.target[0]}:{args.target[1]}, "
        f"delay {args.delay_ms} ms{', stalling' if args.stall else ''}",
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
    parser.add_argument("--stall", action="store_true", help="accept connections, never answer")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must not be negative")
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
