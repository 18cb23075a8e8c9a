"""Liandong node: federated, signed exchange between enforcement agencies."""

import os as _os

# Peers speak TLS 1.3 only (docs/protocol.md section 3). grpcio has no setting for the lowest
# TLS version; it reads this variable once, when grpc is first imported, and hands it to its
# BoringSSL, where the list selects TLS 1.2 suites only. Its single suite needs a pre-shared
# key, which gRPC never configures, so no TLS 1.2 handshake can complete, as server or as
# client, while TLS 1.3 keeps its own suites (BoringSSL always enables those; a list naming
# only TLS 1.3 suites is refused as "Invalid cipher list"). Set here because every entry point
# (`liandong`, `python -m node.cli`) loads this package before anything imports grpc.
_os.environ["GRPC_SSL_CIPHER_SUITES"] = "ECDHE-PSK-CHACHA20-POLY1305"
