"""The standard gRPC health service, with `List` answered.

grpcio-health-checking's servicer leaves `List` (added to grpc.health.v1 in 2024) raising
NotImplementedError; newer probes call it. This one keeps the statuses it was given, so
`List` answers the same snapshot `Check` would, service by service.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2


class NodeHealth(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType] = {}
        self._closing = False

    async def set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        if not self._closing:
            self._statuses[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._closing = True
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._statuses.items()
            }
        )
