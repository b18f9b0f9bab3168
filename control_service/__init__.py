"""The control plane: TrainingSessionService over gRPC, state in PostgreSQL, no heavy work in requests."""
