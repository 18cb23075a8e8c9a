"""The audit log's Merkle tree in the database, and the sequencer that grows it.

Every entry is a leaf (node.audit.merkle). Stored are the perfect subtrees at levels 4, 8,
12, ... (table ``merkle_nodes``): one row per 16 entries, so appending costs the log few
extra writes. Any other node is recomputed on demand from at most 16 hashes: those of the
stored level below it, or, under level 4, the entries' leaf hashes. A root or a proof at any
size therefore reads O(log n) short rows in one query per stored level and never rebuilds
the tree.

The sequencer (``TreeSequencer``) runs inside the group-commit writer's transaction
(node.store.writer): after the units of a batch have queued their audit entries it hashes
them, in index order, into its in-memory right edge of the tree (``Frontier``), queues the
level-8k nodes they complete and a checkpoint of the new tree signed by the node, so entries,
tree and checkpoint commit together or not at all. Each checkpoint extends the one before it
by construction: the sequencer only ever appends to the tree it signed last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from node.audit.checkpoint import Checkpoint
from node.audit.merkle import Frontier, frontier_keys, inclusion_proof, leaf_hash, node_hash
from node.audit.proof import LogProof
from node.store.models import AUDIT_ENTRIES, CHECKPOINTS, MERKLE_NODES
from node.store.writer import Batch

# Stored every TILE_HEIGHT levels: 4 keeps a proof under a millisecond at a million entries
# (measured: 8 needed ~5 ms, reading and hashing 256 entries a level) for ~7 % more rows.
TILE_HEIGHT = 4
# The sequencer keeps every node over the last RECENT_LEAVES entries, and those at
# KEPT_LEVEL and up for good (one per 4096 entries), so fresh entries' proofs come from memory.
RECENT_LEAVES = 8192
KEPT_LEVEL = 12


def utc_now() -> datetime:
    return datetime.now(UTC)


def _fold(hashes: list[bytes]) -> bytes:
    """The root of a perfect subtree from its 2**k children (left to right)."""
    while len(hashes) > 1:
        hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


class NodeCache:
    """Perfect subtrees already computed from stored nodes, kept across requests.

    A perfect subtree never changes once complete (the log only grows), so a node's own
    reads may keep them; bounded, and emptied when full. Only nodes built from stored nodes
    are kept (level TILE_HEIGHT and up), never the leaves' hashes read from entry rows.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self.hashes: dict[tuple[int, int], bytes] = {}

    def keep(self, key: tuple[int, int], value: bytes) -> None:
        if key[0] < TILE_HEIGHT or not self.limit:
            return
        if len(self.hashes) >= self.limit:
            self.hashes.clear()
        self.hashes[key] = value


class StoredTree:
    """A node.audit.merkle.NodeSource over the database: any perfect subtree, on demand."""

    def __init__(self, session: Session, cache: NodeCache | None = None) -> None:
        self.session = session
        self.cache = cache or NodeCache(0)

    def __call__(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        found: dict[tuple[int, int], bytes] = {}
        # Each key needs the 2**(level - base) hashes of its stored base level below it.
        wants: dict[int, list[tuple[int, int, tuple[int, int]]]] = {}
        for level, index in keys:
            cached = self.cache.hashes.get((level, index))
            if cached is not None:
                found[(level, index)] = cached
                continue
            base = level - level % TILE_HEIGHT
            span = level - base
            first = index << span
            wants.setdefault(base, []).append((first, first + (1 << span), (level, index)))
        for base, ranges in wants.items():
            hashes = self._base_hashes(base, [(start, end) for start, end, _ in ranges])
            for start, end, key in ranges:
                children = [hashes.get(i) for i in range(start, end)]
                if all(child is not None for child in children):
                    found[key] = _fold([c for c in children if c is not None])
                    self.cache.keep(key, found[key])
        return found

    def _base_hashes(self, base: int, ranges: Iterable[tuple[int, int]]) -> dict[int, bytes]:
        # One indexed range query per run of hashes (an OR of ranges in one statement makes
        # SQLite scan the whole table), with statements built once: building a statement
        # costs more than running it.
        hashes: dict[int, bytes] = {}
        unrecorded: list[int] = []
        connection = self.session.connection()  # Core: the ORM's per-call work buys nothing here
        for start, end in _merge(ranges):
            if base == 0:
                rows = connection.execute(_LEAVES, {"start": start, "end": end})
            else:
                rows = connection.execute(_NODES, {"level": base, "start": start, "end": end})
            for index, value in rows:
                if value is None:
                    unrecorded.append(index)
                else:
                    hashes[index] = bytes(value)
        if unrecorded:  # a log written before entries recorded their hash
            for index, entry in self.session.execute(
                select(AUDIT_ENTRIES.c.idx, AUDIT_ENTRIES.c.entry).where(
                    AUDIT_ENTRIES.c.idx.in_(unrecorded)
                )
            ):
                hashes[index] = leaf_hash(entry)
        return hashes


_LEAVES = select(AUDIT_ENTRIES.c.idx, AUDIT_ENTRIES.c.leaf_hash).where(
    AUDIT_ENTRIES.c.idx >= bindparam("start"), AUDIT_ENTRIES.c.idx < bindparam("end")
)
_NODES = select(MERKLE_NODES.c.idx, MERKLE_NODES.c.hash).where(
    MERKLE_NODES.c.level == bindparam("level"),
    MERKLE_NODES.c.idx >= bindparam("start"),
    MERKLE_NODES.c.idx < bindparam("end"),
)


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def stored_nodes(nodes: Iterable[tuple[int, int, bytes]]) -> list[dict[str, object]]:
    """The rows to store of the nodes an append completed: every TILE_HEIGHT-th level."""
    return [
        {"level": level, "idx": index, "hash": value}
        for level, index, value in nodes
        if level and level % TILE_HEIGHT == 0
    ]


class TreeSequencer:
    """Integrates each batch's audit entries into the tree, in the batch's transaction.

    Plugged into the BatchWriter (``sequencer=``); the writer calls ``integrate`` before it
    writes a batch, then ``committed`` or ``rolled_back``. With `sign` (the node's
    node.envelope.sign_note, bound to its key and `origin`) every batch that adds entries
    also stores a signed checkpoint of the tree it leaves.
    """

    def __init__(self, origin: str = "", sign: Callable[[bytes], bytes] | None = None) -> None:
        self.origin = origin
        self._sign = sign
        self._frontier: Frontier | None = None  # as committed
        self._working: Frontier | None = None  # with the current batch
        self._working_note: bytes | None = None
        self.latest_note: bytes | None = None  # the last committed checkpoint
        # Every node of the recent tree, in memory, so a fresh entry's proof needs no reads:
        # all levels for the last RECENT_LEAVES entries, and the high levels for good.
        self._nodes: dict[tuple[int, int], bytes] = {}
        self._working_nodes: list[tuple[int, int, bytes]] = []
        self._wanted: dict[int, bytes] = {}  # index -> entry, for the batch being written
        self._proofs: dict[int, LogProof] = {}

    @property
    def size(self) -> int:
        return 0 if self._frontier is None else self._frontier.size

    def root(self) -> bytes:
        """Root of the committed tree (the writer has committed at least one batch)."""
        if self._frontier is None:
            raise RuntimeError("the tree is loaded with the writer's first batch")
        return self._frontier.root()

    def integrate(self, batch: Batch) -> None:
        if self._frontier is None:
            self._frontier = self._load(batch)
        working = self._frontier.copy()
        self._working_note = None
        self._working_nodes = []
        entries = sorted(batch.queued_rows(AUDIT_ENTRIES), key=lambda row: int(row["idx"]))
        wanted = set(batch.proof_requests)
        self._wanted = {int(r["idx"]): r["entry"] for r in entries if r["idx"] in wanted}
        for row in entries:
            if row["idx"] != working.size:
                raise RuntimeError(
                    f"audit entry {row['idx']} queued while the tree has {working.size} "
                    "leaves: indices must be dense"
                )
            leaf = row.get("leaf_hash") or leaf_hash(row["entry"])
            completed = working.append(leaf)
            self._working_nodes.extend(completed)
            for node in stored_nodes(completed):
                batch.insert(MERKLE_NODES, node)
        if entries and self._sign is not None:
            root = working.root()
            signed = self._sign(Checkpoint(self.origin, working.size, root).body())
            batch.insert(
                CHECKPOINTS,
                {"size": working.size, "root": root, "note": signed, "signed_at": utc_now()},
            )
            self._working_note = signed
        self._working = working

    def committed(self) -> None:
        if self._working is not None:
            self._frontier, self._working = self._working, None
        if self._working_note is not None:
            self.latest_note, self._working_note = self._working_note, None
        self._remember_nodes(self._working_nodes)
        self._working_nodes = []
        if self._wanted and self._frontier is not None and self.latest_note is not None:
            size = self._frontier.size
            for index, entry in self._wanted.items():
                try:
                    hashes = inclusion_proof(index, size, self._memory)
                except LookupError:
                    continue  # not all in memory (just after a restart): no proof this time
                self._proofs[index] = LogProof(index, tuple(hashes), self.latest_note, entry)
        self._wanted = {}

    def rolled_back(self) -> None:
        # Reloaded from the database with the next batch: the store is the truth.
        self._frontier = self._working = None
        self._working_note = None
        self._working_nodes = []
        self._wanted = {}

    def take_proof(self, index: int) -> LogProof | None:
        """The proof made at commit for an entry a unit asked for (once), or None."""
        return self._proofs.pop(index, None)

    def _memory(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        return {key: self._nodes[key] for key in keys if key in self._nodes}

    def _remember_nodes(self, nodes: Iterable[tuple[int, int, bytes]]) -> None:
        for level, index, value in nodes:
            self._nodes[(level, index)] = value
        if self._frontier is None or len(self._nodes) < 4 * RECENT_LEAVES:
            return
        # Drop the low levels of subtrees that ended more than RECENT_LEAVES entries ago.
        horizon = self._frontier.size - RECENT_LEAVES
        for key in [k for k in self._nodes if k[0] < KEPT_LEVEL and (k[1] + 1) << k[0] <= horizon]:
            del self._nodes[key]

    def _load(self, batch: Batch) -> Frontier:
        """The committed tree's right edge, first filling in nodes a log written before the
        tree existed (or by an older version) does not have yet."""
        session = batch.session
        size = session.scalar(select(func.count()).select_from(AUDIT_ENTRIES)) or 0
        tiles = (
            session.scalar(
                select(func.count())
                .select_from(MERKLE_NODES)
                .where(MERKLE_NODES.c.level == TILE_HEIGHT)
            )
            or 0
        )
        self.latest_note = session.scalar(
            select(CHECKPOINTS.c.note).order_by(CHECKPOINTS.c.size.desc()).limit(1)
        )
        covered = min(size, tiles << TILE_HEIGHT)
        frontier = Frontier.load(covered, StoredTree(session))
        self._nodes = dict(zip(frontier_keys(covered), frontier.hashes, strict=True))
        if covered < size:
            rows = session.execute(
                select(AUDIT_ENTRIES.c.entry)
                .where(AUDIT_ENTRIES.c.idx >= covered)
                .order_by(AUDIT_ENTRIES.c.idx)
            )
            for (entry,) in rows:
                completed = frontier.append(leaf_hash(entry))
                self._remember_nodes(completed)
                for node in stored_nodes(completed):
                    batch.insert(MERKLE_NODES, node)
        return frontier
