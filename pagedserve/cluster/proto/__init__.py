"""Generated gRPC code for pagedserve.proto (see its header to regenerate)."""
