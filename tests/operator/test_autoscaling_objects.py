"""HPA and KEDA objects per pool: valid against their schemas, on the same metric and knobs as the policy."""

import copy
import pathlib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from support.examples import split_inference

from phasesplit.control.spec import SplitInferenceSpec
from phasesplit.operator.builders import Owner
from phasesplit.operator.scaler_objects import build_hpa as hpa_of, build_scaled_object as scaled_object_of

KEDA_SCHEMA = yaml.safe_load((pathlib.Path(__file__).parent / "schemas" / "keda-scaledobject-v2.16.yaml").read_text())
K8S_VERSION = "1.35"


OWNER = Owner("tiny", "ml", "0b8e-uid")


def build_hpa(doc: dict, pool: str) -> dict:
    return hpa_of(OWNER, SplitInferenceSpec.model_validate(doc["spec"]), pool)


def build_scaled_object(doc: dict, pool: str) -> dict:
    return scaled_object_of(OWNER, SplitInferenceSpec.model_validate(doc["spec"]), pool)


@pytest.fixture
def si():
    return split_inference(namespace="ml", spec={
        "autoscaling": {"mode": "hpa", "prometheus": {"url": "http://prometheus.monitoring:9090"}},
        "pools": {"token": {"autoscaling": {"metric": "kvUtilization", "targetPerReplica": 0.75,
                                            "scaleUpMaxStep": 2, "scaleDownStabilizationSeconds": 120}}}})


@pytest.mark.parametrize("pool", ["prompt", "token"])
def test_hpa_validates_against_the_kubernetes_schema(si, pool):
    hpa = build_hpa(si, pool)
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"tiny-{pool}"}
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == "0b8e-uid"


def test_hpa_follows_the_pool_knobs(si):
    prompt, token = build_hpa(si, "prompt")["spec"], build_hpa(si, "token")["spec"]
    metric = prompt["metrics"][0]["external"]
    assert metric["metric"] == {"name": "phasesplit_queue_tokens",
                                "selector": {"matchLabels": {"pool": "prompt", "service": "tiny"}}}
    assert metric["target"] == {"type": "AverageValue", "averageValue": "512"}
    assert (prompt["minReplicas"], prompt["maxReplicas"]) == (1, 3)
    # kvUtilization is a pool average: a Value target, in milli-units
    assert token["metrics"][0]["external"]["target"] == {"type": "Value", "value": "750m"}
    assert token["behavior"]["scaleUp"]["policies"][0]["value"] == 2
    assert token["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120


def test_a_broken_hpa_fails_the_schema_check(si):
    hpa = build_hpa(si, "prompt")
    hpa["spec"]["metrics"][0]["external"]["target"]["averageValue"] = {"not": "a quantity"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


@pytest.mark.parametrize("pool", ["prompt", "token"])
def test_scaled_object_validates_against_the_keda_schema(si, pool):
    so = build_scaled_object(si, pool)
    jsonschema.validate(so, KEDA_SCHEMA)
    trigger = so["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["serverAddress"] == "http://prometheus.monitoring:9090"
    assert f'pool="{pool}"' in trigger["metadata"]["query"]
    assert 'namespace="ml",service="tiny"' in trigger["metadata"]["query"]


def test_scaled_object_uses_the_pool_knobs(si):
    prompt, token = build_scaled_object(si, "prompt")["spec"], build_scaled_object(si, "token")["spec"]
    assert prompt["triggers"][0]["metadata"]["query"] == \
        'sum(phasesplit_queue_tokens{namespace="ml",service="tiny",pool="prompt"})'
    assert (prompt["triggers"][0]["metricType"], prompt["triggers"][0]["metadata"]["threshold"]) == ("AverageValue", "512")
    assert (token["triggers"][0]["metricType"], token["triggers"][0]["metadata"]["threshold"]) == ("Value", "0.75")
    assert (prompt["minReplicaCount"], prompt["maxReplicaCount"], prompt["pollingInterval"]) == (1, 3, 15)


def test_a_broken_scaled_object_fails_the_keda_schema(si):
    so = build_scaled_object(si, "prompt")
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 512    # KEDA wants strings in trigger metadata
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, KEDA_SCHEMA)
    so = build_scaled_object(si, "prompt")
    so["spec"]["maxReplicas"] = 3                               # HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, KEDA_SCHEMA)


@pytest.mark.parametrize("edit, builder, field", [
    (lambda s: s["spec"]["autoscaling"].pop("prometheus"), build_scaled_object, "spec.autoscaling.prometheus.url"),
    (lambda s: s["spec"]["pools"]["prompt"]["autoscaling"].update(scaleDownStabilizationSeconds=7200), build_hpa,
     "scaleDownStabilizationSeconds"),
])
def test_unusable_spec_names_the_field(si, edit, builder, field):
    si = copy.deepcopy(si)
    edit(si)
    with pytest.raises(ValueError, match=field):
        builder(si, "prompt")


def test_a_pool_at_min_zero_scales_from_zero_with_keda_and_keeps_one_with_an_hpa(si):
    si = copy.deepcopy(si)
    si["spec"]["pools"]["token"]["autoscaling"]["minReplicas"] = 0
    so = build_scaled_object(si, "token")
    jsonschema.validate(so, KEDA_SCHEMA)
    assert so["spec"]["minReplicaCount"] == 0
    held = so["spec"]["triggers"][1]
    assert held["metadata"]["query"] == \
        'clamp_max(sum(phasesplit_inflight_requests{namespace="ml",service="tiny",pool="token"}), 1)'
    assert (held["metricType"], held["metadata"]["threshold"], held["metadata"]["activationThreshold"]) == \
        ("Value", "1", "0")
    assert len(build_scaled_object(si, "prompt")["spec"]["triggers"]) == 1, "a pool at min 1 needs no activation"
    hpa = build_hpa(si, "token")
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    assert hpa["spec"]["minReplicas"] == 1   # 0 would need the HPAScaleToZero feature gate
