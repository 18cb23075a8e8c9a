"""Audit bundles: one agency's log, self-contained, for offline verification.

A bundle is a ZIP file (deflate) holding:

- ``manifest.json`` — format, agency, log origin, the index range of the entries, and the
  left edge of the tree at the first entry (``start_frontier``, base64 hashes) so a bundle
  that starts mid-log can still be recomputed;
- ``entries.log`` — the entries from ``first_index``, one per line (canonical JSON never
  contains a raw newline);
- ``checkpoints.jsonl`` — ``{"size": N, "note": "<signed note>"}`` per checkpoint the node
  signed in that range (and the one at ``first_index`` when it is not 0);
- ``messages.jsonl`` — per message the entries name: its signed envelope, and the receipts
  (for a received message, the one this node signed; for a sent one, each recipient's, with
  the recipient's tlog-proof that it logged the message);
- ``registry.json`` — the federation registry the node was running on, as the operator signed
  it, and ``operator.pub`` — the operator's public key that signed it;
- ``registries/<n>.json`` — every earlier registry the node ran on, so that a signature made
  under a key a later registry no longer lists still verifies.

Writing happens on the node (node.audit.export); reading and checking anywhere
(node.audit.verify).
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson

FORMAT = "liandong-audit-bundle/1"
READ_BUFFER = 1 << 20


class BundleError(ValueError):
    """A file that is not a readable bundle; str() names the file and the part."""


@dataclass
class Manifest:
    agency: str
    origin: str
    federation: str
    created_at: str
    first_index: int
    end_index: int  # one past the last entry
    start_frontier: list[bytes]
    since: str = ""
    until: str = ""
    messages: int = 0  # lines in messages.jsonl (0 in bundles written before it was counted)

    def to_json(self) -> bytes:
        data = {
            "format": FORMAT,
            "agency": self.agency,
            "origin": self.origin,
            "federation": self.federation,
            "created_at": self.created_at,
            "first_index": self.first_index,
            "end_index": self.end_index,
            "start_frontier": [base64.b64encode(h).decode() for h in self.start_frontier],
            "since": self.since,
            "until": self.until,
            "messages": self.messages,
        }
        return json.dumps(data, ensure_ascii=False, indent=2).encode() + b"\n"


@dataclass(frozen=True)
class BundledMessage:
    message_id: str
    direction: str  # "in" or "out"
    envelope: bytes  # serialized Envelope, as stored
    receipts: dict[str, bytes] = field(default_factory=dict)  # by the agency that signed it
    # Sent messages: each recipient's tlog-proof that it logged the message.
    proofs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    registry: bytes
    operator_key_pem: bytes
    checkpoints: list[tuple[int, bytes]]
    _zip: zipfile.ZipFile
    earlier_registries: list[bytes] = field(default_factory=list)

    def entries(self) -> Iterator[tuple[int, bytes]]:
        """(index, entry) in order, read as they are needed."""
        index = self.manifest.first_index
        # ZipExtFile's own readline is slow; a buffer over it reads lines 5x faster.
        with (
            self._zip.open("entries.log") as raw,
            io.BufferedReader(cast(Any, raw), READ_BUFFER) as stream,
        ):
            for line in stream:
                yield index, line.rstrip(b"\n")
                index += 1

    def message_lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of messages.jsonl, unparsed: parsing can happen elsewhere."""
        with (
            self._zip.open("messages.jsonl") as raw,
            io.BufferedReader(cast(Any, raw), READ_BUFFER) as stream,
        ):
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    yield number, line

    def close(self) -> None:
        self._zip.close()


class BundleWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6)
        self._entries = self._zip.open("entries.log", "w", force_zip64=True)
        self.entries = 0

    def add_entry(self, entry: bytes) -> None:
        if b"\n" in entry:
            raise BundleError(f"{self.path}: an audit entry contains a newline")
        self._entries.write(entry + b"\n")
        self.entries += 1

    def finish(
        self,
        manifest: Manifest,
        *,
        registry: bytes,
        operator_key_pem: bytes,
        checkpoints: list[tuple[int, bytes]],
        messages: list[BundledMessage],
        earlier_registries: Sequence[bytes] = (),
    ) -> None:
        self._entries.close()
        for number, data in enumerate(earlier_registries, start=1):
            self._zip.writestr(f"registries/{number}.json", data)
        self._zip.writestr("manifest.json", manifest.to_json())
        self._zip.writestr("registry.json", registry)
        self._zip.writestr("operator.pub", operator_key_pem)
        self._zip.writestr(
            "checkpoints.jsonl",
            b"".join(
                json.dumps({"size": size, "note": note.decode()}).encode() + b"\n"
                for size, note in checkpoints
            ),
        )
        self._zip.writestr(
            "messages.jsonl",
            b"".join(_message_line(message) for message in messages),
        )
        self._zip.close()

    def abort(self) -> None:
        self._entries.close()
        self._zip.close()
        self.path.unlink(missing_ok=True)


def parse_message_line(path: Path, number: int, line: bytes) -> BundledMessage:
    """One line of messages.jsonl; BundleError naming the line when it is malformed."""
    try:
        # orjson: three times faster than json on these lines, a tenth of what checking a
        # message costs an auditor (the rest is mostly the two signatures).
        item = orjson.loads(line)
        receipts, proofs = item["receipts"], item.get("proofs", {})
        if not isinstance(receipts, dict) or not isinstance(proofs, dict):
            raise TypeError("receipts and proofs must be JSON objects (by agency)")
        return BundledMessage(
            message_id=str(item["message_id"]),
            direction=str(item["direction"]),
            envelope=base64.b64decode(item["envelope"]),
            receipts={k: base64.b64decode(v) for k, v in receipts.items()},
            proofs={k: _text(v).encode() for k, v in proofs.items()},
        )
    except (ValueError, TypeError, KeyError) as error:
        raise BundleError(f"{path}: messages.jsonl line {number} is malformed: {error!r}") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a proof must be text, not {type(value).__name__}")
    return value


def _message_line(message: BundledMessage) -> bytes:
    data = {
        "message_id": message.message_id,
        "direction": message.direction,
        "envelope": base64.b64encode(message.envelope).decode(),
        "receipts": {k: base64.b64encode(v).decode() for k, v in message.receipts.items()},
        "proofs": {k: v.decode() for k, v in message.proofs.items()},
    }
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"


def read_bundle(path: Path) -> Bundle:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise BundleError(f"{path}: not an audit bundle (a ZIP file): {error}") from None
    try:
        manifest = _manifest(path, _json(path, archive, "manifest.json"))
        checkpoints = [
            (int(item["size"]), str(item["note"]).encode())
            for item in _json_lines(path, archive, "checkpoints.jsonl")
        ]
        archive.getinfo("messages.jsonl")  # read lazily, by Bundle.message_lines()
        registry = archive.read("registry.json")
        operator = archive.read("operator.pub")
        earlier = [
            archive.read(name)
            for name in sorted(archive.namelist())
            if name.startswith("registries/") and name.endswith(".json")
        ]
    except KeyError as error:
        archive.close()
        raise BundleError(f"{path}: missing part {error}") from None
    except (ValueError, TypeError) as error:
        archive.close()
        raise BundleError(f"{path}: malformed: {error}") from None
    return Bundle(path, manifest, registry, operator, checkpoints, archive, earlier)


def _json(path: Path, archive: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(archive.read(name))
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: {name} is not JSON: {error}") from None


def _json_lines(path: Path, archive: zipfile.ZipFile, name: str) -> list[Any]:
    lines = archive.read(name).splitlines()
    try:
        return [json.loads(line) for line in lines if line]
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: {name} is not JSON lines: {error}") from None


def _manifest(path: Path, data: Any) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: manifest.json is not a {FORMAT} manifest")
    return Manifest(
        agency=str(data["agency"]),
        origin=str(data["origin"]),
        federation=str(data["federation"]),
        created_at=str(data["created_at"]),
        first_index=int(data["first_index"]),
        end_index=int(data["end_index"]),
        start_frontier=[base64.b64decode(h) for h in data["start_frontier"]],
        since=str(data.get("since", "")),
        until=str(data.get("until", "")),
        messages=int(data.get("messages", 0)),
    )
