"""RFC 6962 / RFC 9162 Merkle trees over the audit log: hashes, proofs and their verification.

The tree is never rebuilt. What is stored are the hashes of its *perfect subtrees*: the node
at ``(level, index)`` is the hash of the ``2**level`` leaves starting at ``index * 2**level``.
Appending a leaf adds at most ``log2(n)`` of them (the subtrees it completes), and every root,
inclusion proof and consistency proof of RFC 9162 §2.1 is assembled from ``O(log n)`` stored
nodes: any range the RFC's recursion asks for is either one perfect subtree or is split into
them. Reading the nodes is the caller's business (``NodeSource``), so the same code serves
the node's database and an auditor's bundle.

Verification (``verify_inclusion``, ``verify_consistency``) follows RFC 9162 §2.1.3.2 and
§2.1.4.2 and needs nothing but hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# (level, index) -> the hash of that perfect subtree; must return a hash for every node the
# tree of the requested size has completed.
NodeSource = Callable[[Sequence[tuple[int, int]]], dict[tuple[int, int], bytes]]

# (level, position) -> the hash there, in one tree: what proofs checked against its root
# showed. A place names the leaves below it, [position * 2**level, (position + 1) *
# 2**level) cut at the tree's size, so a node on the right edge can have two names; both
# hold the same hash.
ProvenNodes = dict[tuple[int, int], bytes]


class ProofError(ValueError):
    """A proof that does not verify, or a request for one that cannot exist."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """The largest power of two smaller than `size` (size > 1): where RFC 6962 splits."""
    return 1 << ((size - 1).bit_length() - 1)


# -- appending -------------------------------------------------------------------------------


def completed_nodes(
    index: int, leaf: bytes, left_siblings: Callable[[int], bytes]
) -> list[tuple[int, int, bytes]]:
    """The perfect subtrees that appending leaf `index` (hash `leaf`) completes.

    Returns ``(level, index, hash)`` for the leaf itself and each subtree above it that it
    finishes; `left_siblings(level)` gives the hash of the perfect subtree at `level` just
    left of the new one (it exists whenever it is asked for).
    """
    nodes = [(0, index, leaf)]
    level, position, value = 0, index, leaf
    while position & 1:
        value = node_hash(left_siblings(level), value)
        level, position = level + 1, position >> 1
        nodes.append((level, position, value))
    return nodes


class Frontier:
    """The right edge of a tree: the roots of its perfect subtrees, left to right.

    Enough to append leaves and to give the root at the current size, in O(log n) memory;
    the sequencer keeps one in memory and stores every node it completes.
    """

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} frontier hashes")
        self.size = size
        # One per set bit of size, highest level first.
        self.hashes = list(hashes)

    @classmethod
    def load(cls, size: int, source: NodeSource) -> Frontier:
        keys = frontier_keys(size)
        nodes = source(keys)
        return cls(size, [nodes[key] for key in keys])

    def copy(self) -> Frontier:
        return Frontier(self.size, self.hashes)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; return the nodes it completes, as completed_nodes does."""
        # Each trailing 1 bit of the size is a perfect subtree the new leaf merges with.
        merges = (self.size ^ (self.size + 1)).bit_length() - 1
        keep = len(self.hashes) - merges
        siblings = self.hashes[keep:]  # lowest level last
        nodes = completed_nodes(self.size, leaf, lambda level: siblings[-1 - level])
        del self.hashes[keep:]
        self.hashes.append(nodes[-1][2])
        self.size += 1
        return nodes

    def push(self, leaf: bytes) -> None:
        """Add one leaf hash, as `append` does, without listing the nodes it completes: for
        a verifier, which only needs roots (a third of the cost)."""
        hashes, size, value = self.hashes, self.size, leaf
        while size & 1:
            value = hashlib.sha256(b"\x01" + hashes.pop() + value).digest()
            size >>= 1
        hashes.append(value)
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        value = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            value = node_hash(left, value)
        return value


def frontier_keys(size: int) -> list[tuple[int, int]]:
    """(level, index) of the perfect subtrees that make up a tree of `size` leaves."""
    keys = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            keys.append((level, start >> level))
            start += 1 << level
    return keys


# -- ranges, roots and proofs from stored nodes ---------------------------------------------


def _range_keys(start: int, end: int) -> list[tuple[int, int]]:
    """The perfect subtrees that MTH(D[start:end]) is built from, left to right.

    `start` must be a multiple of the largest power of two not above end - start (true of
    every range RFC 6962's recursion produces from [0, n)).
    """
    keys = []
    while start < end:
        level = (end - start).bit_length() - 1
        # The left-most perfect subtree at `start` no larger than what remains.
        while start % (1 << level):
            level -= 1
        keys.append((level, start >> level))
        start += 1 << level
    return keys


def _fold(hashes: list[bytes]) -> bytes:
    """MTH of a range from its perfect subtrees (left to right, non-increasing sizes)."""
    value = hashes[-1]
    for left in reversed(hashes[:-1]):
        value = node_hash(left, value)
    return value


class _Ranges:
    """Plans the ranges a computation needs, fetches all their nodes at once, then hashes."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> int:
        self.ranges.append((start, end))
        return len(self.ranges) - 1

    def resolve(self, source: NodeSource) -> list[bytes]:
        plans = [_range_keys(start, end) for start, end in self.ranges]
        wanted = sorted({key for plan in plans for key in plan})
        nodes = source(wanted)
        missing = [key for key in wanted if key not in nodes]
        if missing:
            raise LookupError(f"tree nodes missing from storage: {missing[:5]}")
        return [_fold([nodes[key] for key in plan]) for plan in plans]


def root_at(size: int, source: NodeSource) -> bytes:
    """MTH(D[0:size])."""
    if size == 0:
        return EMPTY_ROOT
    ranges = _Ranges()
    ranges.add(0, size)
    return ranges.resolve(source)[0]


def inclusion_proof(index: int, size: int, source: NodeSource) -> list[bytes]:
    """PATH(index, D[0:size]) (RFC 9162 §2.1.3.1), bottom to top."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of {size} leaves")
    ranges = _Ranges()
    order: list[int] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            order.append(ranges.add(start + k, end))
            end = start + k
        else:
            order.append(ranges.add(start, start + k))
            start += k
    hashes = ranges.resolve(source)
    return [hashes[i] for i in reversed(order)]


def consistency_proof(old_size: int, new_size: int, source: NodeSource) -> list[bytes]:
    """PROOF(old_size, D[0:new_size]) (RFC 9162 §2.1.4.1)."""
    if not 0 < old_size <= new_size:
        raise ProofError(
            f"no consistency proof from size {old_size} to {new_size}: "
            "the old size must be at least 1 and at most the new one"
        )
    ranges = _Ranges()
    order: list[int] = []
    # SUBPROOF(m, D[start:end], b), unrolled; the proof is built bottom-up, so collect the
    # path top-down and reverse it at the end.
    m, start, end, complete = old_size, 0, new_size, True
    while True:
        n = end - start
        if m == n:
            if not complete:
                order.append(ranges.add(start, end))
            break
        k = _split(n)
        if m <= k:
            order.append(ranges.add(start + k, end))
            end = start + k
        else:
            order.append(ranges.add(start, start + k))
            m -= k
            start += k
            complete = False
    hashes = ranges.resolve(source)
    return [hashes[i] for i in reversed(order)]


# -- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) -----------------------------------------


def verify_inclusion(
    index: int,
    size: int,
    leaf: bytes,
    proof: Sequence[bytes],
    root: bytes,
    proven: ProvenNodes | None = None,
) -> None:
    """Raise ProofError unless `proof` shows leaf hash `leaf` at `index` under `root`.

    `proven`, for many proofs against one root (a batch of receipts under one checkpoint):
    the nodes the proofs already checked against it showed (RFC 9162 §2.1.3.2's walk, with
    each node named by its place). Neighbouring leaves share their
    upper paths, so where a proof's node and its sibling are both the proven ones, their
    parent is taken instead of hashed. Every hash of the proof is still either hashed into
    the path or found equal to the proven node at its place: what passes is exactly what
    would pass alone. The nodes of a proof that passes are added.
    """
    proven = {} if proven is None else proven
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    _check_hashes([leaf, *proof])
    fn, sn, level = index, size - 1, 0
    here, value = (0, index), leaf
    shown: list[tuple[tuple[int, int], bytes]] = []
    for sibling in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            if not fn & 1:
                while fn and not fn & 1:  # the right edge: moves up unchanged
                    fn >>= 1
                    sn >>= 1
                    level += 1
            beside = (level, fn - 1)
            left, right = sibling, value
        else:
            beside = (level, fn + 1)
            left, right = value, sibling
        fn >>= 1
        sn >>= 1
        level += 1
        parent = (level, fn)
        known = proven.get(parent)
        if known is None or proven.get(here) != value or proven.get(beside) != sibling:
            shown.append((here, value))
            shown.append((beside, sibling))
            value = node_hash(left, right)
        else:
            value = known
        here = parent
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if value != root:
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root")
    shown.append((here, root))
    proven.update(shown)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ProofError unless `proof` shows the tree of `new_root` extends that of `old_root`."""
    _check_hashes([old_root, new_root, *proof])
    if old_size > new_size:
        raise ProofError(f"size {old_size} is larger than {new_size}: a log never shrinks")
    if old_size == new_size:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same size {old_size}")
        return
    if old_size == 0:
        raise ProofError("consistency with the empty tree proves nothing; size 1 or more")
    if not proof:
        raise ProofError("empty consistency proof between different sizes")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    first = path[0]
    fr = sr = first
    for sibling in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(sibling, fr)
            sr = node_hash(sibling, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the root of size {old_size}")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the root of size {new_size}")


def _check_hashes(hashes: Iterable[bytes]) -> None:
    for value in hashes:
        if len(value) != HASH_SIZE:
            raise ProofError(f"a hash of {len(value)} bytes; SHA-256 hashes have {HASH_SIZE}")
