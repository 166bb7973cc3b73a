"""The gRPC face of the bank: convert (protobuf), servicer (thin), server, interceptors, auth, metrics."""
