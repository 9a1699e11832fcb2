"""Generated protobuf and gRPC code for snapwake.v1 (make proto)."""
