"""The worker settings, declared once: what the operator and local mode tell a pool's workers is what
the worker's own command line reads back, and the operator can read the declarations without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.examples import EXAMPLES, load_example

from phasesplit.control import spec as si
from phasesplit.control.worker_config import WorkerConfig
from phasesplit.control.worker_settings import worker_settings
from phasesplit.local import plan as local_plan
from phasesplit.roles.server import parse_args


def spec_of(doc: dict) -> si.SplitInferenceSpec:
    return si.SplitInference.model_validate(doc).spec


def read_back(spec: si.SplitInferenceSpec, role: str) -> WorkerConfig:
    """A worker's config from the settings as the operator passes them (ConfigMap values in place)."""
    flags = [arg for s in worker_settings(spec, role, "/models/model") for arg in s.literal()]
    return parse_args(["--role", role, "--model", "/models/model", *flags])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_worker_reads_back_every_setting_its_pool_is_given(path):
    doc = load_example(path.stem)
    doc["spec"]["kvTransfer"] = {"backend": "tcp", "layerwise": False, "leaseSeconds": 12.5, "tcp": {"port": 29700}}
    doc["spec"]["model"]["simulated"] = {"timeScale": 2.5, "profiles": "p.csv", "poolHardware": {"token": "a100"}}
    first_pool = next(iter(doc["spec"]["pools"]))
    doc["spec"]["pools"][first_pool].setdefault("engine", {}).update(chunkedPrefill=False, prefixCaching=False)
    spec = spec_of(doc)
    for role, pool in spec.pools.items():
        config = read_back(spec, role)
        assert config.chunked_prefill is (role != first_pool) is pool.engine.chunked_prefill
        assert config.engine_config("cpu").chunked_prefill is config.chunked_prefill
        assert config.prefix_caching is (role != first_pool) is pool.engine.prefix_caching
        assert config.engine_config("cpu").prefix_caching is config.prefix_caching
        assert (config.dtype, config.kv_backend, config.kv_lease, config.kv_transfer_timeout, config.layerwise,
                config.kv_tcp_port) == (spec.model.dtype, "tcp", 12.5, spec.kv_transfer.timeout_seconds, False, 29700)
        assert (config.block_size, config.max_num_seqs, config.max_num_batched_tokens, config.tensor_parallel) == (
            pool.engine.block_size, pool.engine.max_num_seqs, pool.engine.max_num_batched_tokens,
            pool.tensor_parallel_size)
        assert (config.engine, config.sim_time_scale, config.sim_profiles) == ("sim", 2.5, "/models/model/p.csv")
        assert config.sim_hardware == ("a100" if role == "token" else spec.model.simulated.hardware)


def test_a_spec_that_leaves_the_kv_settings_out_gives_the_workers_their_own_defaults():
    doc = load_example("tiny-cpu")
    doc["spec"].pop("kvTransfer", None)
    spec = spec_of(doc)
    role = next(role for role, _ in spec.pools.items())
    given, own = read_back(spec, role), parse_args(["--role", role, "--model", "/models/model"])
    assert (given.kv_backend, given.kv_lease, given.kv_transfer_timeout, given.layerwise, given.chunked_prefill,
            given.prefix_caching) == (own.kv_backend, own.kv_lease, own.kv_transfer_timeout, own.layerwise,
                                      own.chunked_prefill is True, own.prefix_caching is True)


def test_local_mode_rejects_a_backend_the_transport_does_not_know():
    resource = si.SplitInference.model_validate(load_example("tiny-cpu"))
    with pytest.raises(ValueError, match="--kv-backend must be one of grpc, nccl, tcp"):
        local_plan.build_plan(resource, "/m", kv_backend="rdma")


def test_the_operator_imports_neither_torch_nor_grpc_to_read_the_worker_settings():
    probe = "import sys, phasesplit.operator.main; print(sorted({'torch', 'grpc'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
