"""The CRD (schema, defaults and CEL rules, as the API server applies them) and the pydantic spec
accept every example and reject the same invalid specs, each naming the offending field."""

import copy

import pydantic
import pytest
from support.examples import EXAMPLES, load_example

from phasesplit.control import spec as si
from phasesplit.operator import crd
from support.crd_validator import validate

CRD = crd.build_crd()


def _set(doc, dotted, value):
    *parents, leaf = dotted.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value


DELETE = object()

# (what is wrong, [(field, value), ...], the field the error must name)
INVALID = [
    ("negative replicas", [("spec.pools.prompt.replicas", -1)], "spec.pools.prompt.replicas"),
    ("min > max", [("spec.pools.token.autoscaling.minReplicas", 3), ("spec.pools.token.autoscaling.maxReplicas", 2),
                   ("spec.pools.token.replicas", 2)], "spec.pools.token.autoscaling.minReplicas"),
    ("replicas above max", [("spec.pools.prompt.replicas", 9)], "spec.pools.prompt.replicas"),
    ("unknown backend", [("spec.kvTransfer.backend", "rdma")], "spec.kvTransfer.backend"),
    ("missing model source", [("spec.model.source", {})], "spec.model.source"),
    ("two model sources", [("spec.model.source.pvc", {"claimName": "models"})], "spec.model.source"),
    ("relative host path", [("spec.model.source.hostPath.path", "models/tiny")], "spec.model.source.hostPath.path"),
    ("missing model name", [("spec.model.name", DELETE)], "spec.model.name"),
    ("unknown dtype", [("spec.model.dtype", "int4")], "spec.model.dtype"),
    ("tiny maxModelLen", [("spec.model.maxModelLen", 0)], "spec.model.maxModelLen"),
    ("port out of range", [("spec.router.service.port", 70000)], "spec.router.service.port"),
    ("unknown service type", [("spec.router.service.type", "External")], "spec.router.service.type"),
    ("unknown metric", [("spec.pools.token.autoscaling.metric", "gpuUtilization")],
     "spec.pools.token.autoscaling.metric"),
    ("utilization target above 1", [("spec.pools.token.autoscaling.metric", "kvUtilization")],
     "spec.pools.token.autoscaling.targetPerReplica"),
    ("two KV sizes", [("spec.pools.prompt.engine.kvMemoryFraction", 0.5)], "spec.pools.prompt.engine.numKvBlocks"),
    ("KV fraction above 1", [("spec.pools.token.engine.numKvBlocks", DELETE),
                             ("spec.pools.token.engine.kvMemoryFraction", 1.5)],
     "spec.pools.token.engine.kvMemoryFraction"),
    ("block sizes differ", [("spec.pools.token.engine.blockSize", 32)], "spec.pools.token"),
    ("no token pool", [("spec.pools.token", DELETE)], "spec.pools"),
    ("unknown autoscaling mode", [("spec.autoscaling.mode", "vpa")], "spec.autoscaling.mode"),
    ("keda without prometheus", [("spec.autoscaling.mode", "keda")], "spec.autoscaling.prometheus"),
    ("ratio min > max", [("spec.autoscaling.promptToTokenRatio", {"min": 2.0, "max": 1.0})],
     "spec.autoscaling.promptToTokenRatio.min"),
    ("zero KV timeout", [("spec.kvTransfer.timeoutSeconds", 0)], "spec.kvTransfer.timeoutSeconds"),
    ("negative drain timeout", [("spec.pools.token.drainTimeoutSeconds", -5)], "spec.pools.token.drainTimeoutSeconds"),
    ("bad quantity", [("spec.pools.prompt.resources.requests", {"cpu": "lots"})], "spec.pools.prompt.resources"),
    ("GPUs other than the ranks", [("spec.pools.token.resources.limits", {"nvidia.com/gpu": 2})],
     "spec.pools.token.tensorParallelSize"),
    ("zero ranks", [("spec.pools.token.tensorParallelSize", 0)], "spec.pools.token.tensorParallelSize"),
    ("unequal prompt and token ranks", [("spec.pools.prompt.tensorParallelSize", 2)],
     "spec.pools.token.tensorParallelSize"),
    ("a LoadBalancer router without a key", [("spec.router.service.type", "LoadBalancer")], "spec.router.apiKeySecret"),
    ("a NodePort router without a key", [("spec.router.service.type", "NodePort")], "spec.router.apiKeySecret"),
    ("a capability beyond IPC_LOCK", [("spec.pools.token.pod", {"addCapabilities": ["IPC_LOCK", "SYS_ADMIN"]})],
     "spec.pools.token.pod.addCapabilities"),
    ("a hostPath volume", [("spec.pools.token.pod", {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]})],
     "spec.pools.token.pod.volumes"),
    ("a volume with two sources", [("spec.pools.prompt.pod", {"volumes": [
        {"name": "x", "emptyDir": {}, "secret": {"secretName": "s"}}]})], "spec.pools.prompt.pod.volumes"),
]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_crd_and_models_accept_every_example(path):
    doc = load_example(path.stem)
    assert validate(CRD, doc) == []
    si.SplitInference.model_validate(doc)


@pytest.mark.parametrize("what,changes,field", INVALID, ids=[case[0] for case in INVALID])
def test_crd_and_models_reject_invalid_spec_naming_the_field(what, changes, field):
    doc = copy.deepcopy(load_example("tiny-cpu"))
    for dotted, value in changes:
        _set(doc, dotted, value)
    crd_errors = validate(CRD, doc)
    parent, leaf = field.rsplit(".", 1)
    # a missing required field is reported on its parent, naming the field
    assert any(e.startswith(field) or (e.startswith(parent + ":") and leaf in e) for e in crd_errors), crd_errors
    with pytest.raises(pydantic.ValidationError) as raised:
        si.SplitInference.model_validate(doc)
    assert leaf in str(raised.value), str(raised.value)


def test_quantities_accept_kubernetes_forms():
    resources = {"requests": {"cpu": "500m", "memory": "4Gi", "nvidia.com/gpu": 1, "ephemeral-storage": "1e9"}}
    assert si.Resources.model_validate(resources)
    doc = load_example("tiny-cpu")
    doc["spec"]["pools"]["prompt"]["resources"] = resources
    assert validate(CRD, doc) == []


def test_metadata_name_length_is_bounded_for_child_names():
    doc = load_example("tiny-cpu")
    doc["metadata"]["name"] = "x" * 46
    assert any("metadata.name" in e for e in validate(CRD, doc))
    with pytest.raises(pydantic.ValidationError, match="name"):
        si.SplitInference.model_validate(doc)


def test_crd_defaults_match_the_models():
    """What the API server fills in equals what pydantic fills in."""
    from support.crd_validator import apply_defaults
    doc = load_example("tiny-cpu")
    schema = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    defaulted = apply_defaults(schema, copy.deepcopy(doc))["spec"]
    model = si.SplitInferenceSpec.model_validate(doc["spec"]).model_dump(by_alias=True, exclude_none=True, mode="json")
    # pydantic also fills empty lists and maps that the API server leaves absent
    def prune(x):
        if not isinstance(x, dict):
            return x
        return {k: p for k, v in x.items() if (p := prune(v)) not in ({}, [])}
    assert prune(defaulted) == prune(model)


def test_crd_has_status_subresource_printer_columns_and_short_name():
    version = CRD["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Prompt", "Token", "Ready", "Endpoint", "Age"}
    assert CRD["spec"]["names"]["shortNames"] == ["si"]


def test_feasibility_problems_name_the_field():
    doc = load_example("tiny-cpu")
    doc["spec"]["pools"]["token"]["engine"]["numKvBlocks"] = 8  # 128 tokens < maxModelLen 1024
    doc["spec"]["kvTransfer"]["backend"] = "nccl"
    problems = si.feasibility_problems(si.SplitInference.model_validate(doc).spec)
    assert any(p.startswith("pools.token.engine.numKvBlocks") for p in problems), problems
    assert any(p.startswith("pools.prompt.resources") and "nccl" in p for p in problems), problems
    local = si.feasibility_problems(si.SplitInference.model_validate(doc).spec, in_cluster=False)
    assert not any("nccl" in p for p in local), local  # local mode runs nccl over gloo on CPU
    assert any(p.startswith("pools.token.engine.numKvBlocks") for p in local), local


@pytest.mark.parametrize("name", ["7b-chat", "llama.3", "Llama", "chat-"])
def test_a_name_that_cannot_name_a_service_is_refused(name):
    doc = load_example("tiny-cpu")
    doc["metadata"]["name"] = name
    assert any("RFC 1035" in e for e in validate(CRD, doc)), name
    with pytest.raises(pydantic.ValidationError, match="name"):
        si.SplitInference.model_validate(doc)
    doc["metadata"]["name"] = "llama-3"
    assert validate(CRD, doc) == []


def test_a_zero_drain_timeout_that_the_worker_would_refuse_is_refused_here():
    doc = load_example("tiny-cpu")
    doc["spec"]["pools"]["token"]["drainTimeoutSeconds"] = 0
    assert any("drainTimeoutSeconds" in e for e in validate(CRD, doc))
    with pytest.raises(pydantic.ValidationError, match="drainTimeoutSeconds|drain_timeout_seconds"):
        si.SplitInference.model_validate(doc)


def test_printer_columns_show_the_mixed_pool():
    assert ".status.pools.mixed.ready" in [c["jsonPath"] for c in CRD["spec"]["versions"][0]["additionalPrinterColumns"]]


@pytest.mark.parametrize("router", [
    {"service": {"type": "LoadBalancer"}, "apiKeySecret": {"name": "key"}},
    {"service": {"type": "NodePort"}, "allowUnauthenticated": True},
    {"service": {"type": "ClusterIP"}}])
def test_an_exposed_router_has_a_key_or_says_it_needs_none(router):
    doc = load_example("tiny-cpu")
    doc["spec"]["router"] = router
    assert validate(CRD, doc) == []
    si.SplitInference.model_validate(doc)


def test_the_allowed_capabilities_and_volume_types_pass_both():
    doc = load_example("tiny-cpu")
    volumes = [{"name": kind.lower(), kind: {}} for kind in si.ALLOWED_VOLUME_TYPES]
    doc["spec"]["pools"]["token"]["pod"] = {"addCapabilities": list(si.ALLOWED_CAPABILITIES), "volumes": volumes}
    assert validate(CRD, doc) == []
    si.SplitInference.model_validate(doc)


def test_the_volume_and_capability_rules_are_bounded_for_the_cel_cost_estimate():
    overlay = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["pools"][
        "properties"]["token"]["properties"]["pod"]["properties"]
    assert overlay["volumes"]["maxItems"] and overlay["volumes"]["items"]["maxProperties"] == 2
    assert overlay["addCapabilities"]["maxItems"] and overlay["addCapabilities"]["items"]["maxLength"]
