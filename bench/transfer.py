"""Clue-transfer throughput between two real nodes, against a bare gRPC echo baseline.

    python -m bench.transfer [--seconds 20] [--clients 64] [--batch 16] [--runs 3]
                             [--payload 2048] [--backend sqlite|postgresql]
                             [--echo tls|insecure|both] [--json]

Each run:

1. creates a two-node federation (140400/ecology -> 140400/procuratorate) in a temp
   dir with node.federation_setup.create_federation, sets ``[logging] level`` (default
   "warning", JSON to node.log) and starts both as ``liandong serve`` processes;
2. for ``--seconds``, submits clue transfers with a body of about ``--payload`` bytes
   through the sender's local admin API (the LocalAdmin service on the unix socket,
   grpc.aio) on one SubmitStream, in batches of ``--batch`` with ``--clients``
   submissions in flight; then waits until the sender has no pending delivery (or
   ``--drain-cap``);
3. reads each node's peak RSS (VmHWM) and CPU time, stops both nodes, and reads the
   sender's database: per delivery, submit (messages.created_at) to receipt stored
   (deliveries.delivered_at);
4. runs the baseline: a bare grpc.aio unary echo server (bench.echo, its own process;
   mutual TLS with the federation's certificates, and/or insecure) with the same
   payload, driven by a grpc.aio client with the same concurrency for the same time.

delivered/s = delivered receipts / (first submit -> last receipt stored), both read from
the sender's database. The report gives every run and the median over runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from bench import echo
from node._pb.liandong.v1 import admin_pb2, admin_pb2_grpc, envelope_pb2
from node.federation_setup import NodeProcess, NodeSetup, create_federation, free_port

SENDER, RECEIVER = "140400/ecology", "140400/procuratorate"
POSTGRES_ADMIN_URL = os.environ.get(
    "LIANDONG_BENCH_POSTGRES",
    os.environ.get("LIANDONG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
)
STALL_SECONDS = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def proc_status(pid: int, key: str) -> int:
    """A kB figure from /proc/PID/status (VmHWM, VmRSS), in bytes; 0 if unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class BenchNode(NodeProcess):
    """A node process, plus what the benchmark reports about it."""

    def timed_stop(self, timeout: float = 60.0) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code, seconds to stop). None: had to SIGKILL."""
        started = time.monotonic()
        code = self.stop(timeout=timeout)
        return code, time.monotonic() - started

    def log_summary(self, keep: int = 5) -> dict[str, Any]:
        """Lines of node.log by level, and the first distinct warning/error events."""
        levels: Counter[str] = Counter()
        events: Counter[str] = Counter()
        if not self.log_path.exists():
            return {"levels": {}, "events": {}}
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                levels["(not json)"] += 1
                events[f"(not json) {line[:160]}"] += 1
                continue
            level = str(entry.get("level", "?"))
            levels[level] += 1
            if level not in {"info", "debug"}:
                error = str(entry.get("error", ""))[:160]
                events[f"{level}: {entry.get('event', '')} {error}".strip()] += 1
        return {"levels": dict(levels), "events": dict(events.most_common(keep))}


class BenchFailed(Exception):
    pass


# --------------------------------------------------------------------------- set-up


def set_log_level(setup: NodeSetup, level: str) -> None:
    """render_config already has a [logging] table: add the level to it (JSON to node.log)."""
    config = setup.config.read_text(encoding="utf-8")
    line = 'format = "auto"                # auto: JSON unless stderr is a terminal\n'
    if line not in config:
        raise BenchFailed(f"{setup.config}: [logging] format line not found; update bench")
    setup.config.write_text(
        config.replace(line, f'format = "json"\nlevel = "{level}"\n'), encoding="utf-8"
    )


def create_pg_databases(names: Sequence[str] = (SENDER, RECEIVER)) -> dict[str, str]:
    """A new database on the local server for each of `names` (drop_pg_databases drops them)."""
    import psycopg

    urls = {}
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        for agency in names:
            name = f"liandong_bench_{uuid.uuid4().hex[:12]}"
            connection.execute(f'CREATE DATABASE "{name}"')
            base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
            urls[agency] = base.replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    return urls


def drop_pg_databases(urls: dict[str, str]) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        for url in urls.values():
            name = url.rsplit("/", 1)[1]
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def body_json(payload: int, number: int) -> str:
    """A clue body whose JSON is `payload` bytes (at least the fixed part)."""
    head = {"title": f"bench clue {number:09d}", "subject": "bench", "facts": ""}
    fixed = len(json.dumps(head))
    head["facts"] = "x" * max(0, payload - fixed)
    return json.dumps(head)


# --------------------------------------------------------------------------- load


@dataclass
class SubmitPhase:
    accepted: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    started_wall: float = 0.0
    ended_wall: float = 0.0
    seconds: float = 0.0
    pending_samples: list[tuple[float, int]] = field(default_factory=list)


def submit_request(payload: int, number: int, typed: bool) -> admin_pb2.SubmitRequest:
    text = body_json(payload, number)
    if typed:
        clue = json_format.Parse(text, envelope_pb2.ClueTransfer())
        return admin_pb2.SubmitRequest(family="clue", recipients=[RECEIVER], clue=clue)
    return admin_pb2.SubmitRequest(family="clue", recipients=[RECEIVER], body_json=text)


async def submit_load(
    stub: admin_pb2_grpc.LocalAdminStub,
    *,
    clients: int,
    seconds: float,
    payload: int,
    mode: str = "stream",
    typed: bool = False,
    batch: int = 16,
) -> SubmitPhase:
    phase = SubmitPhase()
    counter = iter(range(1 << 62))
    phase.started_wall = time.time()
    started = time.monotonic()
    deadline = started + seconds

    async def stream_caller() -> None:
        # One SubmitStream call: batches of `batch` submissions, up to `clients` submissions
        # (clients // batch batches) in flight.
        slots = asyncio.Semaphore(max(1, clients // batch))
        sent_at: dict[int, float] = {}

        async def batches() -> AsyncIterator[admin_pb2.SubmitBatch]:
            while time.monotonic() < deadline:
                await slots.acquire()
                group = admin_pb2.SubmitBatch()
                for _ in range(batch):
                    request = submit_request(payload, next(counter), typed)
                    request.seq = len(sent_at) + 1
                    sent_at[request.seq] = time.monotonic()
                    group.requests.append(request)
                yield group

        try:
            async for answer in stub.SubmitStream(batches()):
                slots.release()
                for result in answer.results:
                    if result.code:
                        phase.errors[f"code {result.code}: {result.message[:200]}"] += 1
                        continue
                    phase.latencies.append(time.monotonic() - sent_at[result.seq])
                    phase.accepted.append(result.message_id)
        except grpc.aio.AioRpcError as error:
            phase.errors[f"{error.code().name}: {(error.details() or '')[:200]}"] += 1

    async def caller() -> None:
        while time.monotonic() < deadline:
            request = submit_request(payload, next(counter), typed)
            before = time.monotonic()
            try:
                answer = await stub.Submit(request, timeout=60)
            except grpc.aio.AioRpcError as error:
                phase.errors[f"{error.code().name}: {(error.details() or '')[:200]}"] += 1
                continue
            phase.latencies.append(time.monotonic() - before)
            phase.accepted.append(answer.message_id)

    async def sampler() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            with contextlib.suppress(grpc.aio.AioRpcError):
                info = await stub.NodeInfo(admin_pb2.NodeInfoRequest(), timeout=10)
                phase.pending_samples.append((time.monotonic() - started, info.pending_deliveries))

    if mode == "stream":
        await asyncio.gather(sampler(), stream_caller())
    else:
        await asyncio.gather(sampler(), *(caller() for _ in range(clients)))
    phase.seconds = time.monotonic() - started
    phase.ended_wall = time.time()
    return phase


@dataclass
class DrainPhase:
    seconds: float = 0.0
    pending_left: int = -1
    stalled: bool = False
    samples: list[tuple[float, int]] = field(default_factory=list)


async def drain(stub: admin_pb2_grpc.LocalAdminStub, cap: float) -> DrainPhase:
    """Wait until the sender has no pending delivery, or `cap` seconds, or a stall."""
    phase = DrainPhase()
    started = time.monotonic()
    last_change, last_pending = started, -1
    while True:
        now = time.monotonic()
        try:
            info = await stub.NodeInfo(admin_pb2.NodeInfoRequest(), timeout=10)
            pending = info.pending_deliveries
        except grpc.aio.AioRpcError:
            pending = last_pending
        phase.samples.append((now - started, pending))
        if pending != last_pending:
            last_change, last_pending = now, pending
        phase.pending_left = pending
        if pending == 0:
            break
        if now - started > cap:
            break
        if now - last_change > max(STALL_SECONDS, 0.0) and now - started > STALL_SECONDS:
            # No progress for a while: still waits up to the cap, but record it.
            phase.stalled = True
        await asyncio.sleep(0.25)
    phase.seconds = time.monotonic() - started
    return phase


# --------------------------------------------------------------------------- database


def read_outcome(sender_url: str, receiver_url: str, accepted: list[str]) -> dict[str, Any]:
    from sqlalchemy import func, select

    from node.store.db import make_engine, session_factory
    from node.store.models import DeliveryRecord, MessageRecord

    engine = make_engine(sender_url)
    with session_factory(engine)() as session:
        rows = session.execute(
            select(
                MessageRecord.message_id,
                MessageRecord.created_at,
                func.length(MessageRecord.envelope),
                DeliveryRecord.state,
                DeliveryRecord.attempts,
                DeliveryRecord.delivered_at,
                DeliveryRecord.last_error,
            )
            .join(DeliveryRecord, DeliveryRecord.message_id == MessageRecord.message_id)
            .where(MessageRecord.direction == "out")
        ).all()
    engine.dispose()
    engine = make_engine(receiver_url)
    with session_factory(engine)() as session:
        inbound = session.scalar(
            select(func.count()).select_from(MessageRecord).where(MessageRecord.direction == "in")
        )
    engine.dispose()
    stored = {row.message_id for row in rows}
    delivered = [row for row in rows if row.state == "delivered"]
    latencies = sorted((r.delivered_at - r.created_at).total_seconds() for r in delivered)
    first = min((r.created_at for r in rows), default=None)
    last = max((r.delivered_at for r in delivered), default=None)
    errors = Counter(r.last_error[:200] for r in rows if r.state != "delivered" and r.last_error)
    return {
        "stored": len(rows),
        "accepted_not_stored": len(set(accepted) - stored),
        "delivered": len(delivered),
        "not_delivered": len(rows) - len(delivered),
        "retried": sum(1 for r in rows if r.attempts > 1),
        "receiver_inbound": inbound or 0,
        "envelope_bytes": statistics.mean(r[2] for r in rows) if rows else 0,
        "first_created": first,
        "last_delivered": last,
        "latencies": latencies,
        "delivered_offsets": [(r.delivered_at - first).total_seconds() for r in delivered]
        if first
        else [],
        "pending_errors": dict(errors.most_common(5)),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# --------------------------------------------------------------------------- echo


async def run_echo(
    mode: str, tls: tuple[Path, Path, Path, Path, Path], args: argparse.Namespace
) -> dict[str, Any]:
    """tls = (ca, server key, server cert, client key, client cert)."""
    ca, server_key, server_cert, client_key, client_cert = tls
    port = free_port()
    command = [sys.executable, "-m", "bench.echo", "--port", str(port)]
    credentials = None
    if mode == "tls":
        command += ["--key", str(server_key), "--cert", str(server_cert), "--ca", str(ca)]
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=client_key.read_bytes(),
            certificate_chain=client_cert.read_bytes(),
        )
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert server.stdout is not None
        line = await asyncio.to_thread(server.stdout.readline)
        if line.strip() != b"ready":
            raise BenchFailed(f"echo server ({mode}) did not start: {line!r}")
        cpu_before, self_before = cpu_seconds(server.pid), self_cpu_seconds()
        result = await echo.drive(
            f"127.0.0.1:{port}",
            credentials,
            clients=args.clients,
            seconds=args.seconds,
            payload=args.payload,
        )
        server_cpu = cpu_seconds(server.pid) - cpu_before
        client_cpu = self_cpu_seconds() - self_before
        peak = proc_status(server.pid, "VmHWM")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        "mode": mode,
        "calls": result.calls,
        "seconds": result.seconds,
        "calls_per_second": result.per_second,
        "errors": dict(result.errors),
        "server_peak_rss_mb": peak / 2**20,
        "server_cpu_seconds": server_cpu,
        "client_cpu_seconds": client_cpu,
    }


# --------------------------------------------------------------------------- one run


async def run_once(number: int, args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="ld-bench-"))
    pg_urls: dict[str, str] = {}
    nodes: list[BenchNode] = []
    channel: grpc.aio.Channel | None = None
    try:
        if args.backend == "postgresql":
            pg_urls = create_pg_databases()
        setups = create_federation(
            root, [SENDER, RECEIVER], database_urls=pg_urls, extra_config=args.node_config
        )
        for setup in setups:
            set_log_level(setup, args.log_level)
        nodes = [BenchNode(s) for s in setups]
        sender, receiver = nodes
        for node in nodes:
            node.start(wait=False)
        channel = grpc.aio.insecure_channel(f"unix:{sender.setup.admin_socket}")
        stub = admin_pb2_grpc.LocalAdminStub(channel)
        await asyncio.to_thread(sender.wait_serving)
        await asyncio.to_thread(receiver.wait_serving)

        say(f"run {number}: submitting for {args.seconds:g} s with {args.clients} clients ...")
        cpu0 = [cpu_seconds(n.pid) for n in nodes]
        self0 = self_cpu_seconds()
        submit = await submit_load(
            stub,
            clients=args.clients,
            seconds=args.seconds,
            payload=args.payload,
            mode=args.submit,
            typed=args.body == "typed",
            batch=args.batch,
        )
        cpu_submit = [cpu_seconds(n.pid) - c for n, c in zip(nodes, cpu0, strict=True)]
        self_submit = self_cpu_seconds() - self0
        say(
            f"run {number}: {len(submit.accepted)} accepted "
            f"({len(submit.accepted) / submit.seconds:.0f}/s); draining ..."
        )
        drained = await drain(stub, args.drain_cap)
        cpu_total = [cpu_seconds(n.pid) - c for n, c in zip(nodes, cpu0, strict=True)]
        peaks = [proc_status(n.pid, "VmHWM") / 2**20 for n in nodes]
        await channel.close()
        channel = None
        stops = [n.timed_stop() for n in nodes]
        logs = [n.log_summary() for n in nodes]
        urls = [pg_urls.get(s.agency) or f"sqlite:///{s.directory / 'node.db'}" for s in setups]
        outcome = read_outcome(urls[0], urls[1], submit.accepted)

        tls = (
            root / "operator" / "ca.crt",
            receiver.setup.directory / "keys" / "tls.key",
            receiver.setup.directory / "tls.crt",
            sender.setup.directory / "keys" / "tls.key",
            sender.setup.directory / "tls.crt",
        )
        echoes = {}
        for mode in ("tls", "insecure") if args.echo == "both" else (args.echo,):
            say(f"run {number}: echo baseline ({mode}) for {args.seconds:g} s ...")
            echoes[mode] = await run_echo(mode, tls, args)
    finally:
        if channel is not None:
            await channel.close()
        for node in nodes:
            node.stop()
        if pg_urls:
            drop_pg_databases(pg_urls)
        if args.keep:
            say(f"run {number}: files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    first: datetime | None = outcome["first_created"]
    last: datetime | None = outcome["last_delivered"]
    window = (last - first).total_seconds() if first and last else 0.0
    submit_end = datetime.fromtimestamp(submit.ended_wall, UTC)
    load_window = (submit_end - first).total_seconds() if first else 0.0
    offsets = outcome.pop("delivered_offsets")
    under_load = sum(1 for offset in offsets if offset <= load_window)
    latencies = outcome.pop("latencies")
    outcome.pop("first_created")
    outcome.pop("last_delivered")
    delivered_per_second = outcome["delivered"] / window if window > 0 else 0.0
    reference = echoes.get("tls") or next(iter(echoes.values()))
    result = {
        "run": number,
        "loadavg_1min_before": load_before,
        "accepted": len(submit.accepted),
        "submit_errors": dict(submit.errors),
        "submit_seconds": submit.seconds,
        "submitted_per_second": len(submit.accepted) / submit.seconds,
        "submit_latency_p50_ms": 1000 * percentile(submit.latencies, 0.50),
        "submit_latency_p99_ms": 1000 * percentile(submit.latencies, 0.99),
        "delivered_per_second": delivered_per_second,
        "delivered_window_seconds": window,
        "delivered_during_submit_per_second": under_load / load_window if load_window else 0.0,
        "backlog_at_submit_end": len(submit.accepted) - under_load,
        "drain_seconds": drained.seconds,
        "drain_stalled": drained.stalled,
        "pending_left": drained.pending_left,
        "latency_p50_ms": 1000 * percentile(latencies, 0.50),
        "latency_p99_ms": 1000 * percentile(latencies, 0.99),
        "latency_max_ms": 1000 * (latencies[-1] if latencies else float("nan")),
        **outcome,
        "sender_peak_rss_mb": peaks[0],
        "receiver_peak_rss_mb": peaks[1],
        "sender_cpu_seconds_submit": cpu_submit[0],
        "receiver_cpu_seconds_submit": cpu_submit[1],
        "client_cpu_seconds_submit": self_submit,
        "sender_cpu_seconds_total": cpu_total[0],
        "receiver_cpu_seconds_total": cpu_total[1],
        "stop_exit_codes": [code for code, _ in stops],
        "stop_seconds": [round(seconds, 2) for _, seconds in stops],
        "sender_log": logs[0],
        "receiver_log": logs[1],
        "pending_samples": submit.pending_samples,
        "echo": echoes,
        "echo_mode_for_ratio": reference["mode"],
        "echo_calls_per_second": reference["calls_per_second"],
        "ratio": delivered_per_second / reference["calls_per_second"]
        if reference["calls_per_second"]
        else 0.0,
    }
    return result


# --------------------------------------------------------------------------- report


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(run[key]) for run in runs)


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Liandong clue-transfer benchmark: {SENDER} -> {RECEIVER}, backend {args.backend}, "
        f"{args.clients} clients ({args.submit} submit, batches of {args.batch}), "
        f"{args.seconds:g} s, body {args.payload} B, "
        f"{len(runs)} run(s), {os.cpu_count()} CPU(s), node log level {args.log_level}",
        "",
    ]
    header = (
        f"{'run':>3} {'submit/s':>9} {'deliv/s':>8} {'during':>7} {'echo/s':>8} {'ratio':>6} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'RSS snd':>8} {'RSS rcv':>8} {'accepted':>8} "
        f"{'deliv':>7} {'drain s':>7} {'load1':>5}"
    )
    lines.append(header)
    for run in runs:
        lines.append(
            f"{run['run']:>3} {run['submitted_per_second']:>9.0f} "
            f"{run['delivered_per_second']:>8.0f} "
            f"{run['delivered_during_submit_per_second']:>7.0f} "
            f"{run['echo_calls_per_second']:>8.0f} {run['ratio']:>6.3f} "
            f"{run['latency_p50_ms']:>8.0f} {run['latency_p99_ms']:>8.0f} "
            f"{run['sender_peak_rss_mb']:>7.0f}M {run['receiver_peak_rss_mb']:>7.0f}M "
            f"{run['accepted']:>8} {run['delivered']:>7} {run['drain_seconds']:>7.1f} "
            f"{run['loadavg_1min_before']:>5.1f}"
        )

    def m(key: str, digits: int = 0) -> str:
        return f"{median(runs, key):.{digits}f}"

    ratio_mode = runs[0]["echo_mode_for_ratio"]
    rows = [
        ("submitted/s (accepted by the local API)", m("submitted_per_second")),
        (
            "delivered/s (first submit -> last receipt)",
            m("delivered_per_second") + "   (target >= 1000)",
        ),
        ("delivered/s while submitting", m("delivered_during_submit_per_second")),
    ]
    for mode in runs[0]["echo"]:
        value = statistics.median(run["echo"][mode]["calls_per_second"] for run in runs)
        rows.append((f"echo calls/s ({mode})", f"{value:.0f}"))
    rows += [
        (f"ratio delivered/s / echo ({ratio_mode}) calls/s", m("ratio", 3) + "   (target >= 0.2)"),
        (
            "submit -> receipt latency p50 / p99 (ms)",
            f"{m('latency_p50_ms')} / {m('latency_p99_ms')}",
        ),
        (
            "admin Submit latency p50 / p99 (ms)",
            f"{m('submit_latency_p50_ms', 1)} / {m('submit_latency_p99_ms', 1)}",
        ),
        (
            "peak RSS sender / receiver (MiB)",
            f"{m('sender_peak_rss_mb')} / {m('receiver_peak_rss_mb')}",
        ),
        ("signed envelope size (bytes, mean)", m("envelope_bytes")),
    ]
    lines += ["", "Median over runs:"]
    lines += [f"  {label:<46} {value}" for label, value in rows]
    lines += [
        "",
        "CPU seconds during the submit phase (sender / receiver / load client):",
    ]
    for run in runs:
        lines.append(
            f"  run {run['run']}: {run['sender_cpu_seconds_submit']:.1f} / "
            f"{run['receiver_cpu_seconds_submit']:.1f} / {run['client_cpu_seconds_submit']:.1f}"
            f" of {run['submit_seconds']:.1f} s wall; whole run incl. drain sender "
            f"{run['sender_cpu_seconds_total']:.1f}, receiver "
            f"{run['receiver_cpu_seconds_total']:.1f}; echo ({run['echo_mode_for_ratio']}) "
            f"server {run['echo'][run['echo_mode_for_ratio']]['server_cpu_seconds']:.1f}, "
            f"client {run['echo'][run['echo_mode_for_ratio']]['client_cpu_seconds']:.1f}"
        )
    lines += ["", "Correctness:"]
    problems = 0
    for run in runs:
        issues = []
        if run["submit_errors"]:
            issues.append(f"submit errors {run['submit_errors']}")
        if run["accepted_not_stored"]:
            issues.append(f"{run['accepted_not_stored']} accepted ids missing from the sender DB")
        if run["not_delivered"]:
            issues.append(
                f"{run['not_delivered']} not delivered after {run['drain_seconds']:.0f} s drain "
                f"(errors: {run['pending_errors']})"
            )
        if run["drain_stalled"]:
            issues.append(f"pending deliveries did not move for >= {STALL_SECONDS:.0f} s")
        if run["receiver_inbound"] != run["delivered"]:
            issues.append(
                f"receiver holds {run['receiver_inbound']} inbound, sender has "
                f"{run['delivered']} receipts"
            )
        if run["retried"]:
            issues.append(f"{run['retried']} deliveries needed more than one attempt")
        if run["stop_exit_codes"] != [0, 0]:
            issues.append(f"exit codes on SIGTERM {run['stop_exit_codes']} (None = SIGKILLed)")
        for mode, result in run["echo"].items():
            if result["errors"]:
                issues.append(f"echo {mode} errors {result['errors']}")
        for who in ("sender", "receiver"):
            events = run[f"{who}_log"]["events"]
            if events:
                issues.append(f"{who} log: {events}")
        problems += bool(issues)
        lines.append(f"  run {run['run']}: " + ("; ".join(issues) if issues else "ok"))
    lines.append(
        "  every accepted transfer stored, delivered once and receipted"
        if not problems
        else f"  {problems} run(s) with problems (see above)"
    )
    return "\n".join(lines)


def summary(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "submitted_per_second",
        "delivered_per_second",
        "delivered_during_submit_per_second",
        "echo_calls_per_second",
        "ratio",
        "latency_p50_ms",
        "latency_p99_ms",
        "submit_latency_p50_ms",
        "submit_latency_p99_ms",
        "sender_peak_rss_mb",
        "receiver_peak_rss_mb",
    )
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "cpus": os.cpu_count(),
        "median": {key: median(runs, key) for key in keys},
        "runs": runs,
    }


# --------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for number in range(1, args.runs + 1):
        runs.append(await run_once(number, args))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transfer",
        description="Clue-transfer throughput between two nodes vs a bare gRPC echo.",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="submit phase length")
    parser.add_argument(
        "--clients", type=int, default=64, help="submissions in flight (unary: callers)"
    )
    parser.add_argument(
        "--submit",
        choices=["stream", "unary"],
        default="stream",
        help="local API: one SubmitStream with --clients submissions in flight in batches of "
        "--batch, or --clients unary callers",
    )
    parser.add_argument(
        "--body",
        choices=["json", "typed"],
        default="json",
        help="submit the body as JSON text or as a typed protobuf message",
    )
    parser.add_argument(
        "--batch", type=int, default=16, help="submissions per SubmitBatch on the stream"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs; the report gives medians")
    parser.add_argument("--payload", type=int, default=2048, help="body size in bytes")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--echo",
        choices=["tls", "insecure", "both"],
        default="tls",
        help="echo baseline transport (ratio uses tls when measured)",
    )
    parser.add_argument(
        "--drain-cap", type=float, default=120.0, help="max seconds to wait for pending == 0"
    )
    parser.add_argument("--log-level", default="warning", help="nodes' [logging] level")
    parser.add_argument(
        "--node-config",
        default="",
        help="TOML appended to both node.toml files, after [plugins] (e.g. 'enabled = []')",
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    parser.add_argument(
        "--json", action="store_true", help="JSON on stdout (the report goes to stderr)"
    )
    args = parser.parse_args(argv)
    try:
        runs = asyncio.run(main_async(args))
    except BenchFailed as error:
        say(f"bench.transfer: FAILED: {error}")
        return 1
    text = report(runs, args)
    if args.json:
        say(text)
        print(json.dumps(summary(runs, args), indent=2, default=str))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
