"""The worker roles: the engine thread and the gRPC services of prompt, token and mixed workers."""
