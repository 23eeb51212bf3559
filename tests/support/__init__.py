"""What the test suites share: fake workers and stand-in servers built on the real classes, the
Kubernetes API emulator and operator harness, KV sinks, manifests and waiting helpers.
Importable as `support` (pytest's `pythonpath` is `tests/`)."""
