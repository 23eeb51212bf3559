"""KV transfer between prompt and token workers, behind one interface (gRPC, NCCL/gloo)."""
