"""Generated gRPC stubs for imagetraining.v1 (do not edit; run `make protos`)."""
