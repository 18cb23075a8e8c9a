"""The bulk paths: Deliver (node to node) and SubmitStream (local API) carry batches and
answer each message of a batch on its own."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import grpc
import pytest

from node._pb.liandong.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    envelope_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
)
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess
from tests.peer import (
    anonymous_credentials,
    audit_events,
    clue_message,
    database_rows,
    exchange_stub,
    sign,
    signing_key,
)


def test_deliver_stream_answers_each_message_and_survives_a_bad_one(
    running: dict[str, NodeProcess],
) -> None:
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    key = signing_key(police.setup)
    good = [sign(clue_message(POLICE, [PROCURATORATE]), key) for _ in range(20)]
    tampered = sign(clue_message(POLICE, [PROCURATORATE]), key)
    tampered.payload = tampered.payload + b"\x00"
    requests = [exchange_pb2.DeliveryRequest(seq=n + 1, envelope=e) for n, e in enumerate(good)]
    requests.insert(7, exchange_pb2.DeliveryRequest(seq=99, envelope=tampered))
    # A repeat of an earlier batch's message, and one of the same batch's.
    batches = [
        exchange_pb2.DeliveryBatch(requests=requests[:10]),
        exchange_pb2.DeliveryBatch(
            requests=[
                *requests[10:],
                exchange_pb2.DeliveryRequest(seq=100, envelope=good[0]),
                exchange_pb2.DeliveryRequest(seq=101, envelope=good[15]),
            ]
        ),
    ]

    answers = list(
        exchange_stub(police.setup, procuratorate.setup).Deliver(iter(batches), timeout=60)
    )

    assert sorted(len(a.results) for a in answers) == [10, 13]  # one answer per batch
    results = {r.seq: r for answer in answers for r in answer.results}
    assert set(results) == {r.seq for b in batches for r in b.requests}
    assert results[99].code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "does not verify" in results[99].message
    for seq in range(1, 21):
        assert results[seq].code == 0
        receipt = envelope_pb2.Receipt.FromString(results[seq].receipt.payload)
        assert receipt.receiver == PROCURATORATE
    # Each repeat is answered with the original receipt, and stored once.
    assert results[100].receipt == results[1].receipt
    assert results[101].receipt == results[16].receipt
    assert database_rows(procuratorate.setup, "SELECT count(*) FROM messages") == [(20,)]
    assert [e["event"] for e in audit_events(procuratorate.setup)].count("rejected") == 1


def test_an_oversized_delivery_batch_is_refused_whole_and_audited(
    running: dict[str, NodeProcess],
) -> None:
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    key = signing_key(police.setup)
    envelope = sign(clue_message(POLICE, [PROCURATORATE]), key)
    batch = exchange_pb2.DeliveryBatch(
        requests=[exchange_pb2.DeliveryRequest(seq=n, envelope=envelope) for n in range(1, 258)]
    )

    [answer] = exchange_stub(police.setup, procuratorate.setup).Deliver(iter([batch]), timeout=60)

    # Refused before any request is read: one result, seq 0 (no sender's seq).
    [result] = answer.results
    assert (result.seq, result.code) == (0, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert "a batch of 257 messages is over the limit of 256" in result.message
    rejected = [e for e in audit_events(procuratorate.setup) if e["event"] == "rejected"]
    assert len(rejected) == 1
    assert "over the limit of 256" in rejected[0]["detail"]
    assert database_rows(procuratorate.setup, "SELECT count(*) FROM messages") == [(0,)]


def test_submit_stream_accepts_good_requests_and_refuses_bad_ones(
    running: dict[str, NodeProcess],
) -> None:
    ecology = running[ECOLOGY]
    channel = grpc.insecure_channel(f"unix:{ecology.setup.admin_socket}")
    stub = admin_pb2_grpc.LocalAdminStub(channel)
    requests = [
        admin_pb2.SubmitRequest(
            seq=1,
            family="clue",
            recipients=[PROCURATORATE],
            body_json=json.dumps({"title": "JSON 正文"}),
        ),
        admin_pb2.SubmitRequest(
            seq=2,
            family="clue",
            recipients=[PROCURATORATE],
            clue=envelope_pb2.ClueTransfer(title="类型化正文", facts="暗管"),
        ),
        admin_pb2.SubmitRequest(
            seq=3, family="recommendation", recipients=[POLICE], body_json='{"title": "x"}'
        ),
        admin_pb2.SubmitRequest(
            seq=4,
            family="clue",
            recipients=[PROCURATORATE],
            crime_transfer=envelope_pb2.CrimeTransfer(title="wrong type"),
        ),
    ]
    batches = [
        admin_pb2.SubmitBatch(requests=requests[:1]),
        admin_pb2.SubmitBatch(requests=requests[1:]),
    ]
    answers = list(stub.SubmitStream(iter(batches), timeout=60))
    channel.close()
    assert sorted(len(a.results) for a in answers) == [1, 3]
    results = {r.seq: r for answer in answers for r in answer.results}

    assert results[1].code == 0
    assert results[2].code == 0
    assert results[3].code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "does not permit" in results[3].message
    assert results[4].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    with ecology.client() as client:
        item = client.get_item(results[2].message_id)
    assert json.loads(item.body_json) == {"title": "类型化正文", "facts": "暗管"}
    assert database_rows(ecology.setup, "SELECT count(*) FROM messages") == [(2,)]


def test_sigterm_ends_open_delivery_streams_cleanly(running: dict[str, NodeProcess]) -> None:
    """A stopping node answers what a stream holds and ends it (status OK), not cancels it."""
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    key = signing_key(police.setup)
    outgoing: queue.Queue[exchange_pb2.DeliveryBatch | None] = queue.Queue()

    def requests():  # type: ignore[no-untyped-def]
        while (request := outgoing.get()) is not None:
            yield request

    call = exchange_stub(police.setup, procuratorate.setup).Deliver(requests(), timeout=60)
    envelope = sign(clue_message(POLICE, [PROCURATORATE]), key)
    outgoing.put(exchange_pb2.DeliveryBatch(requests=[{"seq": 1, "envelope": envelope}]))
    first = next(call)
    assert [r.code for r in first.results] == [0]
    # The client keeps its side open; the node is told to stop.
    assert procuratorate.stop() == 0
    assert list(call) == []  # the stream ended without error
    assert call.code() == grpc.StatusCode.OK
    outgoing.put(None)


def test_a_certificate_without_an_agency_is_refused_and_audited(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    """Issued by the federation CA (so TLS accepts it) but naming no agency."""
    procuratorate = running[PROCURATORATE]
    credentials = anonymous_credentials(procuratorate.setup)
    with grpc.secure_channel(procuratorate.setup.endpoint, credentials) as channel:
        stub = exchange_pb2_grpc.ExchangeStub(channel)
        batch = exchange_pb2.DeliveryBatch(requests=[exchange_pb2.DeliveryRequest(seq=1)])
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Deliver(iter([batch]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as unary:
            stub.TransferClue(envelope_pb2.Envelope(), timeout=30)
        assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
    rejected = [e for e in audit_events(procuratorate.setup) if e["event"] == "rejected"]
    assert len(rejected) == 2
    assert all(e["peer"] == "unknown" for e in rejected)
    assert database_rows(procuratorate.setup, "SELECT count(*) FROM messages") == [(0,)]
