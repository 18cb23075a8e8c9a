"""The exchange domain: composing, verifying, storing and delivering messages.

Nothing here knows gRPC: errors carry a :class:`~node.exchange.errors.Reason`
that the servicers map to status codes in one place (node.services.status).
"""
