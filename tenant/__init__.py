"""The tenant side: backends to the frozen model, memory caching, the CLI and the Flower client."""

import os

# gRPC's C core logs every failed TLS handshake to stderr, before our one-line error says what
# is wrong (tenant.coordinator_client.tls_diagnosis). It reads this once, when grpc is imported,
# so it is set here, before any tenant module imports grpc; GRPC_VERBOSITY=debug still works.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
