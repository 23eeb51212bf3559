"""phasesplit: phase-split LLM inference (prompt and token pools) on Kubernetes."""
