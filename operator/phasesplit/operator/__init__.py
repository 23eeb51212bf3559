"""The Kubernetes operator (kopf): reconciles a SplitInference into its pools and router."""
