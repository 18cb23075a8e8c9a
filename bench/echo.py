"""The raw baseline for bench.transfer: a bare grpc.aio unary echo server and its load client.

The server runs as its own process (``python -m bench.echo --port P [--key K --cert C
--ca CA]``), one grpc.aio server with one unary method that returns its request
(a ``google.protobuf.BytesValue``), and prints ``ready`` once it listens. With
``--key/--cert/--ca`` it requires mutual TLS, exactly like a node's peer port.
:func:`drive` is the client: ``clients`` concurrent callers on one grpc.aio
channel, calling as fast as answers come back for a fixed time.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import wrappers_pb2

METHOD = "/bench.Echo/Echo"


async def _echo(
    request: wrappers_pb2.BytesValue, _context: grpc.aio.ServicerContext
) -> wrappers_pb2.BytesValue:
    return request


async def serve(port: int, key: Path | None, cert: Path | None, ca: Path | None) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ("grpc.max_send_message_length", 8 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    handler = grpc.unary_unary_rpc_method_handler(
        _echo,
        request_deserializer=wrappers_pb2.BytesValue.FromString,
        response_serializer=wrappers_pb2.BytesValue.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    address = f"127.0.0.1:{port}"
    if key and cert and ca:
        credentials = grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=ca.read_bytes(),
            require_client_auth=True,
        )
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(1.0)


@dataclass
class EchoResult:
    calls: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


async def drive(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    *,
    clients: int,
    seconds: float,
    payload: int,
) -> EchoResult:
    """Call the echo server with `clients` concurrent callers for `seconds`."""
    options = [
        ("grpc.max_send_message_length", 8 * 1024 * 1024),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ]
    channel = (
        grpc.aio.secure_channel(target, credentials, options)
        if credentials is not None
        else grpc.aio.insecure_channel(target, options)
    )
    call = channel.unary_unary(
        METHOD,
        request_serializer=wrappers_pb2.BytesValue.SerializeToString,
        response_deserializer=wrappers_pb2.BytesValue.FromString,
    )
    request = wrappers_pb2.BytesValue(value=b"x" * payload)
    await asyncio.wait_for(channel.channel_ready(), 30)
    result = EchoResult()
    started = time.monotonic()
    deadline = started + seconds

    async def caller() -> None:
        while time.monotonic() < deadline:
            try:
                answer = await call(request, timeout=30)
                if len(answer.value) != payload:
                    result.errors["short answer"] += 1
                else:
                    result.calls += 1
            except grpc.aio.AioRpcError as error:
                result.errors[f"{error.code().name}: {error.details()}"] += 1

    await asyncio.gather(*(caller() for _ in range(clients)))
    result.seconds = time.monotonic() - started
    await channel.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--ca", type=Path)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.key, args.cert, args.ca))
    return 0


if __name__ == "__main__":
    sys.exit(main())
