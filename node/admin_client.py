"""Client of the local admin API, for the CLI and the demo (never touches the database)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc

from node._pb.liandong.v1 import admin_pb2, admin_pb2_grpc, audit_pb2


class AdminError(Exception):
    """The node refused a call (``code`` is its gRPC status) or no node is running (None)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class AdminClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._stub = admin_pb2_grpc.LocalAdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object) -> object:
        if not self.socket_path.exists():
            raise AdminError(
                f"no node is running with admin socket {self.socket_path} "
                "(start it with: liandong serve --config FILE)"
            )
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as error:
            code = error.code()
            raise AdminError(f"{code.name}: {error.details()}", code) from None

    def submit(
        self,
        *,
        family: str,
        recipients: Sequence[str],
        body_json: str,
        body_type: str = "",
        case_ref: str = "",
        in_reply_to: str = "",
        confidentiality: int = 0,
        attachment_paths: Sequence[str] = (),
        client_key: str = "",
        deadline: str = "",
        field_markings: Mapping[str, int] | None = None,
    ) -> str:
        request = admin_pb2.SubmitRequest(
            family=family,
            recipients=list(recipients),
            body_json=body_json,
            body_type=body_type,
            case_ref=case_ref,
            in_reply_to=in_reply_to,
            confidentiality=confidentiality,  # type: ignore[arg-type]
            attachment_paths=list(attachment_paths),
            client_key=client_key,
            deadline=deadline,
            field_markings=dict(field_markings or {}),  # type: ignore[arg-type]
        )
        response = self._call("Submit", request)
        assert isinstance(response, admin_pb2.SubmitResponse)
        return response.message_id

    def list_items(self, direction: str, limit: int = 100) -> list[admin_pb2.Item]:
        value = (
            admin_pb2.ListItemsRequest.DIRECTION_OUTBOX
            if direction == "outbox"
            else admin_pb2.ListItemsRequest.DIRECTION_INBOX
        )
        response = self._call("ListItems", admin_pb2.ListItemsRequest(direction=value, limit=limit))
        assert isinstance(response, admin_pb2.ListItemsResponse)
        return list(response.items)

    def cases(
        self, *, case_id: str = "", state: str = "", limit: int = 200
    ) -> list[admin_pb2.Case]:
        request = admin_pb2.ListCasesRequest(case_id=case_id, state=state, limit=limit)
        response = self._call("ListCases", request)
        assert isinstance(response, admin_pb2.ListCasesResponse)
        return list(response.cases)

    def decide(
        self, case_id: str, event: str, *, peer: str = "", reason: str = "", date: str = ""
    ) -> admin_pb2.Case:
        request = admin_pb2.DecideCaseRequest(
            case_id=case_id, peer=peer, event=event, reason=reason, date=date
        )
        response = self._call("DecideCase", request)
        assert isinstance(response, admin_pb2.Case)
        return response

    def deadlines(
        self, *, overdue: bool = False, agency: str = "", limit: int = 500
    ) -> list[admin_pb2.Deadline]:
        request = admin_pb2.ListDeadlinesRequest(overdue=overdue, agency=agency, limit=limit)
        response = self._call("ListDeadlines", request)
        assert isinstance(response, admin_pb2.ListDeadlinesResponse)
        return list(response.deadlines)

    def supervision_report(self) -> list[admin_pb2.SupervisionFinding]:
        response = self._call("SupervisionReport", admin_pb2.SupervisionReportRequest())
        assert isinstance(response, admin_pb2.SupervisionReportResponse)
        return list(response.findings)

    def get_item(self, message_id: str) -> admin_pb2.Item:
        response = self._call("GetItem", admin_pb2.GetItemRequest(message_id=message_id))
        assert isinstance(response, admin_pb2.Item)
        return response

    def retry_hand_off(self, message_id: str) -> admin_pb2.Item:
        response = self._call("RetryHandOff", admin_pb2.RetryHandOffRequest(message_id=message_id))
        assert isinstance(response, admin_pb2.Item)
        return response

    def checkpoint(self, size: int = 0) -> audit_pb2.SignedCheckpoint:
        response = self._call("GetCheckpoint", audit_pb2.GetCheckpointRequest(size=size))
        assert isinstance(response, audit_pb2.SignedCheckpoint)
        return response

    def inclusion_proof(
        self, *, message_id: str = "", index: int | None = None, size: int = 0
    ) -> audit_pb2.InclusionProof:
        request = audit_pb2.InclusionProofRequest(size=size)
        if index is not None:
            request.index = index
        else:
            request.message_id = message_id
        response = self._call("GetInclusionProof", request)
        assert isinstance(response, audit_pb2.InclusionProof)
        return response

    def export_audit(
        self, path: Path, since: str = "", until: str = ""
    ) -> Iterator[admin_pb2.ExportProgress]:
        """Ask the node to write a bundle; yields its progress, the summary last."""
        if not self.socket_path.exists():
            self._call("NodeInfo", admin_pb2.NodeInfoRequest())  # raises the usual message
        request = admin_pb2.ExportAuditRequest(path=str(path), since=since, until=until)
        try:
            # No overall deadline: a large log takes a while; progress shows it is alive.
            yield from self._stub.ExportAudit(request)
        except grpc.RpcError as error:
            code = error.code()
            raise AdminError(f"{code.name}: {error.details()}", code) from None

    def node_info(self) -> admin_pb2.NodeInfoResponse:
        response = self._call("NodeInfo", admin_pb2.NodeInfoRequest())
        assert isinstance(response, admin_pb2.NodeInfoResponse)
        return response
