"""The Merkle tree: RFC 6962 known answers, then every size and index against a naive tree."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from node.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    ProofError,
    consistency_proof,
    frontier_keys,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_at,
    verify_consistency,
    verify_inclusion,
)

# RFC 6962 test data as published with the Certificate Transparency reference code
# (transparency-dev/merkle: testonly/constants.go, proof/verify_test.go).
LEAF_INPUTS = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# Perfect subtree hashes by level, then index.
NODE_HASHES = [
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    ["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
]
# (1-based leaf, tree size, proof): proof/verify_test.go's inclusionProofs.
INCLUSION = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        2,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
# (size1, size2, proof): proof/verify_test.go's consistencyProofs.
CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def hexes(values: Sequence[bytes]) -> list[str]:
    return [v.hex() for v in values]


def naive_root(leaves: Sequence[bytes]) -> bytes:
    """MTH straight from RFC 6962 §2.1, recursively, as the reference."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(naive_root(leaves[:k]), naive_root(leaves[k:]))


class MemoryTree:
    """Appends through a Frontier and keeps every node it completes, like the node's store."""

    def __init__(self) -> None:
        self.frontier = Frontier()
        self.nodes: dict[tuple[int, int], bytes] = {}
        self.leaves: list[bytes] = []

    def append(self, entry: bytes) -> None:
        leaf = leaf_hash(entry)
        self.leaves.append(leaf)
        for level, index, value in self.frontier.append(leaf):
            self.nodes[(level, index)] = value

    def nodes_of(self, size: int) -> list[bytes]:
        """Every node of the tree of the first `size` leaves, root included."""

        def walk(start: int, end: int) -> list[bytes]:
            if end - start == 1:
                return [self.leaves[start]]
            k = 1 << ((end - start - 1).bit_length() - 1)
            return [
                naive_root(self.leaves[start:end]),
                *walk(start, start + k),
                *walk(start + k, end),
            ]

        return walk(0, size)

    def source(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        return {key: self.nodes[key] for key in keys if key in self.nodes}


@pytest.fixture(scope="module")
def reference() -> MemoryTree:
    tree = MemoryTree()
    for entry in LEAF_INPUTS:
        tree.append(entry)
    return tree


@pytest.fixture(scope="module")
def larger() -> MemoryTree:
    tree = MemoryTree()
    for n in range(70):
        tree.append(n.to_bytes(2, "big") * 3)
    return tree


def test_roots_match_rfc6962_at_every_size(reference: MemoryTree) -> None:
    for size in range(len(LEAF_INPUTS) + 1):
        assert root_at(size, reference.source).hex() == ROOTS[size]
    assert reference.frontier.root().hex() == ROOTS[8]


def test_stored_nodes_are_rfc6962s_perfect_subtrees(reference: MemoryTree) -> None:
    for level, row in enumerate(NODE_HASHES):
        for index, expected in enumerate(row):
            assert reference.nodes[(level, index)].hex() == expected


def test_inclusion_proofs_match_and_verify(reference: MemoryTree) -> None:
    for leaf, size, expected in INCLUSION:
        proof = inclusion_proof(leaf - 1, size, reference.source)
        assert hexes(proof) == expected
        root = bytes.fromhex(ROOTS[size])
        verify_inclusion(leaf - 1, size, reference.leaves[leaf - 1], proof, root)


def test_consistency_proofs_match_and_verify(reference: MemoryTree) -> None:
    for size1, size2, expected in CONSISTENCY:
        proof = consistency_proof(size1, size2, reference.source)
        assert hexes(proof) == expected
        old, new = bytes.fromhex(ROOTS[size1]), bytes.fromhex(ROOTS[size2])
        verify_consistency(size1, size2, old, new, proof)


def test_every_shape_against_the_naive_tree(larger: MemoryTree) -> None:
    leaves = larger.leaves
    for size in range(1, len(leaves) + 1):
        root = naive_root(leaves[:size])
        assert root_at(size, larger.source) == root
        for index in range(size):
            proof = inclusion_proof(index, size, larger.source)
            verify_inclusion(index, size, leaves[index], proof, root)
        for old in range(1, size + 1):
            proof = consistency_proof(old, size, larger.source)
            verify_consistency(old, size, naive_root(leaves[:old]), root, proof)


def test_frontier_reloads_from_stored_nodes(larger: MemoryTree) -> None:
    for size in (1, 2, 3, 37, 64, 70):
        keys = frontier_keys(size)
        assert sum(1 << level for level, _ in keys) == size
        frontier = Frontier.load(size, larger.source)
        assert frontier.root() == naive_root(larger.leaves[:size])


def test_push_gives_the_roots_append_gives(larger: MemoryTree) -> None:
    for start in (0, 1, 5, 32, 37):
        frontier = Frontier.load(start, larger.source)
        for size in range(start + 1, len(larger.leaves) + 1):
            frontier.push(larger.leaves[size - 1])
            assert (frontier.size, frontier.root()) == (size, naive_root(larger.leaves[:size]))


def test_proofs_against_one_root_share_proven_nodes(larger: MemoryTree) -> None:
    """A batch of proofs under one checkpoint: each takes what the earlier ones proved, and
    every one still verifies, in any order."""
    leaves = larger.leaves
    for size in (1, 2, 7, 33, 64, 70):
        root = naive_root(leaves[:size])
        proven: dict[tuple[int, int], bytes] = {}
        for index in [*range(size), *reversed(range(size))]:
            proof = inclusion_proof(index, size, larger.source)
            verify_inclusion(index, size, leaves[index], proof, root, proven)
        # Each node once under each name it has (a right-edge node can have two).
        assert set(proven.values()) == set(larger.nodes_of(size))


def test_proven_nodes_let_no_wrong_proof_through(larger: MemoryTree) -> None:
    """What a proof would be refused for alone, it is refused for with every other proof of
    the tree already proven, even a change above the part it shares with them."""
    size, leaves = 70, larger.leaves
    root = naive_root(leaves[:size])
    proven: dict[tuple[int, int], bytes] = {}
    for index in range(size):
        proof = inclusion_proof(index, size, larger.source)
        verify_inclusion(index, size, leaves[index], proof, root, proven)
    before = dict(proven)
    proof = inclusion_proof(9, size, larger.source)

    def flipped(position: int) -> list[bytes]:
        changed = list(proof)
        changed[position] = bytes([changed[position][0] ^ 1]) + changed[position][1:]
        return changed

    for index, leaf, path in [
        (9, leaves[8], proof),  # another leaf
        (8, leaves[9], proof),  # another index
        (9, leaves[9], flipped(0)),  # a sibling altered, low
        (9, leaves[9], flipped(len(proof) - 1)),  # and at the top, where all is shared
        (9, leaves[9], proof[:-1]),  # a node removed
        (9, leaves[9], [*proof, root]),  # trailing garbage
        (9, leaves[9], proof[::-1]),  # reordered
    ]:
        with pytest.raises(ProofError):
            verify_inclusion(index, size, leaf, path, root, proven)
    assert proven == before  # a refused proof adds nothing
    with pytest.raises(ProofError):  # another root, with its own (empty) proven nodes
        verify_inclusion(9, size, leaves[9], proof, naive_root(leaves[:69]), {})


def test_inclusion_proof_refusals(reference: MemoryTree) -> None:
    root = bytes.fromhex(ROOTS[8])
    proof = inclusion_proof(5, 8, reference.source)
    leaf = reference.leaves[5]
    for index, size, candidate, path in [
        (4, 8, leaf, proof),  # wrong index
        (6, 8, leaf, proof),
        (5, 16, leaf, proof),  # wrong size
        (5, 4, leaf, proof),
        (5, 8, reference.leaves[4], proof),  # wrong leaf
        (5, 8, leaf, proof[:-1]),  # a node removed
        (5, 8, leaf, [*proof, root]),  # trailing garbage
        (5, 8, leaf, [root, *proof]),  # preceding garbage
        (5, 8, leaf, [bytes([proof[0][0] ^ 8]) + proof[0][1:], *proof[1:]]),  # a bit flipped
        (8, 8, leaf, proof),  # outside the tree
    ]:
        with pytest.raises(ProofError):
            verify_inclusion(index, size, candidate, path, root)
    with pytest.raises(ProofError):
        inclusion_proof(8, 8, reference.source)


def test_consistency_proof_refusals(reference: MemoryTree) -> None:
    old, new = bytes.fromhex(ROOTS[6]), bytes.fromhex(ROOTS[8])
    proof = consistency_proof(6, 8, reference.source)
    for size1, size2, root1, root2, path in [
        (5, 8, old, new, proof),  # wrong size1
        (7, 8, old, new, proof),
        (6, 16, old, new, proof),  # wrong size2
        (6, 8, new, old, proof),  # swapped roots
        (6, 8, old, new, []),  # empty proof
        (6, 8, old, new, proof[:-1]),  # truncated
        (6, 8, old, new, [*proof, new]),  # trailing garbage
        (6, 8, old, new, [old, *proof]),  # preceding garbage
        (8, 6, new, old, proof),  # shrinking
        (0, 8, EMPTY_ROOT, new, proof),  # from the empty tree
        (8, 8, new, old, []),  # same size, different roots
        (8, 8, new, new, proof),  # same size, a proof anyway
    ]:
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, root1, root2, path)
    verify_consistency(8, 8, new, new, [])
    with pytest.raises(ProofError):
        consistency_proof(0, 8, reference.source)
    with pytest.raises(ProofError):
        consistency_proof(9, 8, reference.source)
