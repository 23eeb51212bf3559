"""Local mode runs the tcp backend: its workers get `--kv-backend tcp` (and a free KV port each)."""

from __future__ import annotations

from support.examples import load_example

from phasesplit.local.plan import build_plan, validate_manifest


def test_local_mode_passes_the_tcp_backend_to_every_worker(tmp_path):
    doc = load_example("tiny-cpu")
    doc["spec"]["kvTransfer"] = {"backend": "tcp", "tcp": {"port": 29700}}
    tcp_spec, grpc_spec = validate_manifest(doc), validate_manifest(load_example("tiny-cpu"))
    for plan in (build_plan(tcp_spec, str(tmp_path)), build_plan(grpc_spec, str(tmp_path), kv_backend="tcp")):
        for pool in plan.pools.values():
            args = pool.worker_args
            assert args[args.index("--kv-backend") + 1] == "tcp"
            assert "--kv-tcp-port" not in args  # any free port: several token workers share the machine
