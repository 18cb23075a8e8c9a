"""The audit log: append-only entries, later the leaves of a Merkle tree."""
