"""Liandong node: federated, signed exchange between enforcement agencies."""
