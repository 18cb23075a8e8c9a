"""Exit 0 if the local Liandong node reports SERVING on its admin socket, else 1.

Usage: python healthcheck.py [ADMIN_SOCKET]   (default /var/lib/liandong/admin.sock)

The admin socket serves grpc.health.v1 without TLS; the node reports SERVING only while its
database answers and its registry has not expired past the grace period.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    socket_path = sys.argv[1] if len(sys.argv) > 1 else "/var/lib/liandong/admin.sock"
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
    except grpc.RpcError as error:
        print(f"liandong health: {socket_path}: {error.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"liandong health: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
