"""A planned design as a SplitInference: pools sized, hardware as nodeSelectors, autoscaling around the
plan, each pool's engine set as it was simulated (chunked prefill only in a `chunked` design), CPU and
memory requested beside the GPUs."""

from __future__ import annotations

import math

from phasesplit.fleet.perf import Profiles
from phasesplit.fleet.search import Candidate
from phasesplit.control.spec import SplitInference, feasibility_problems

SOURCES = ("pvc", "hostPath", "image")
PLACEHOLDER_SOURCE = "pvc:models"
PLACEHOLDER_ANNOTATION = "phasesplit.io/placeholder-source"
CPU_PER_GPU = 2            # a rank's engine thread, its gRPC and KV sender threads
MEMORY_GIB_PER_GPU = 32    # host memory a rank needs to stage its weight shards while loading


def model_source(text: str) -> dict:
    """`pvc:CLAIM[/PATH]`, `hostPath:/DIR` or `image:REFERENCE`."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in SOURCES or not rest:
        raise ValueError(f"--source: {text!r} is not pvc:CLAIM[/PATH], hostPath:/DIR or image:REFERENCE")
    if kind == "pvc":
        claim, _, path = rest.partition("/")
        return {"pvc": {"claimName": claim, "path": path}}
    if kind == "hostPath":
        return {"hostPath": {"path": rest}}
    return {"image": {"reference": rest}}


def _pool(profiles: Profiles, model: str, hardware: str, tp: int, machines: int, engine: dict, metric: str,
          target: float) -> dict:
    perf = profiles.get(model, hardware, tp)
    replicas = machines * perf.instances_per_machine
    return {
        "replicas": replicas,
        "tensorParallelSize": tp,
        "autoscaling": {"minReplicas": max(1, math.floor(replicas * 0.5)), "maxReplicas": max(2, replicas * 2),
                        "metric": metric, "targetPerReplica": target},
        "resources": {"requests": {"nvidia.com/gpu": tp, "cpu": str(CPU_PER_GPU * tp),
                                   "memory": f"{MEMORY_GIB_PER_GPU * tp}Gi"},
                      "limits": {"nvidia.com/gpu": tp}},
        "nodeSelector": dict(perf.hardware.node_selector),
        "engine": {**engine, "device": "cuda"},
    }


def split_inference(candidate: Candidate, profiles: Profiles, *, name: str, model: str, served_name: str,
                    tp: int, source: str | None, engine: dict, chunk_budget: int = 0) -> dict:
    """The SplitInference document (validated against the spec models) for one candidate. Without a
    `source` the model source is a placeholder, marked by an annotation."""
    d = candidate.design
    settings = {"maxNumSeqs": engine["max_num_seqs"], "maxNumBatchedTokens": engine["max_num_batched_tokens"],
                "blockSize": engine["block_size"], "chunkedPrefill": False}
    prompt_target = 2.0 * engine["max_num_batched_tokens"]
    token_target = 0.75 * engine["max_num_seqs"]
    if d.kind == "chunked":
        chunked = {**settings, "chunkedPrefill": True, "maxNumBatchedTokens": chunk_budget}
        pools = {"mixed": _pool(profiles, model, d.prompt_hw, tp, candidate.prompt, chunked, "inflightRequests",
                                token_target)}
    elif d.kind == "baseline":
        pools = {"mixed": _pool(profiles, model, d.prompt_hw, tp, candidate.prompt, settings, "inflightRequests",
                                token_target)}
    else:
        pools = {"prompt": _pool(profiles, model, d.prompt_hw, tp, candidate.prompt, settings, "queueTokens",
                                 prompt_target),
                 "token": _pool(profiles, model, d.token_hw, tp, candidate.token, settings, "inflightRequests",
                                token_target)}
        if d.mixed_machines:
            pools["mixed"] = _pool(profiles, model, d.mixed_hw, tp, d.mixed_machines, settings, "inflightRequests",
                                   token_target)
    metadata = {"name": name}
    if source is None:
        metadata["annotations"] = {PLACEHOLDER_ANNOTATION: f"spec.model.source is {PLACEHOLDER_SOURCE}, a "
                                                           "placeholder: set it to where the model files are"}
    doc = {
        "apiVersion": "phasesplit.io/v1alpha1", "kind": "SplitInference", "metadata": metadata,
        "spec": {"model": {"name": served_name, "source": model_source(source or PLACEHOLDER_SOURCE)},
                 "pools": pools,
                 "kvTransfer": {"backend": "nccl", "layerwise": engine["layerwise"]}},
    }
    parsed = SplitInference.model_validate(doc)
    problems = feasibility_problems(parsed.spec)
    if problems:
        raise ValueError("the planned SplitInference cannot work: " + "; ".join(problems))
    return doc
