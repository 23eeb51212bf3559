"""The phasesplit Kubernetes operator (import name: phasesplit.operator)."""
