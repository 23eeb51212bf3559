"""SplitInference status from its children and the autoscaler's record: pure functions, the clock
passed in. The only place that builds `status.conditions`."""

from __future__ import annotations

CONDITION_TYPES = {"router": "RouterReady", "prompt": "PromptPoolReady", "token": "TokenPoolReady",
                   "mixed": "MixedPoolReady"}
METRICS_CONDITION = "MetricsAvailable"
APPLIED_CONDITION = "ChildrenApplied"


def replicas(deployment: dict | None) -> dict:
    """Desired and ready replicas of a Deployment, and the `ready/desired` text printed by kubectl."""
    if deployment is None:
        return {"replicas": 0, "readyReplicas": 0, "ready": "0/0"}
    desired = int((deployment.get("spec") or {}).get("replicas", 1))
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    return {"replicas": desired, "readyReplicas": ready, "ready": f"{ready}/{desired}"}


def component_condition(kind: str, deployment: dict | None) -> tuple[bool, str, str]:
    """(ready, reason, message) for one Deployment: ready once at least one replica serves."""
    if deployment is None:
        return False, "NotCreated", f"the {kind} Deployment does not exist yet"
    counts = replicas(deployment)
    text = f"{counts['ready']} replicas ready"
    if counts["replicas"] == 0:
        return False, "ScaledToZero", text
    if counts["readyReplicas"] == 0:
        return False, "ReplicasNotReady", text
    if counts["readyReplicas"] < counts["replicas"]:
        return True, "PartiallyReady", text
    return True, "ReplicasReady", text


def condition(kind: str, ok: bool, reason: str, message: str, previous: list[dict], generation: int,
              now: str) -> dict:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since}


def metrics_condition(autoscaling: dict, previous: list[dict], generation: int, now: str) -> list[dict]:
    """`MetricsAvailable`, from what the builtin autoscaler last recorded (none before its first read)."""
    metrics = autoscaling.get("metrics")
    if not metrics:
        return []
    return [condition(METRICS_CONDITION, metrics["available"], metrics["reason"], metrics["message"][:1024],
                      previous, generation, now)]


def applied_condition(failures: list[str] | None, previous: list[dict], generation: int, now: str) -> list[dict]:
    """`ChildrenApplied`: False with every child the server refused (None: not applied this time,
    keep what the last apply said)."""
    if failures is None:
        return [c for c in previous if c.get("type") == APPLIED_CONDITION]
    if failures:
        return [condition(APPLIED_CONDITION, False, "ApplyFailed", "; ".join(failures)[:4096], previous,
                          generation, now)]
    return [condition(APPLIED_CONDITION, True, "Applied", "every child is applied", previous, generation, now)]


def build_status(roles: list[str], endpoint: str, deployments: dict[str, dict | None], problems: list[str],
                 previous: dict, generation: int, now: str, autoscaling: dict | None = None,
                 failures: list[str] | None = None) -> dict:
    """The whole status; `deployments` maps "router" and each pool role to its live Deployment;
    `autoscaling` is the builtin autoscaler's record (None: keep the previous one); `failures`: the
    children the server refused in this pass (None: no pass, keep the previous word)."""
    autoscaling = (previous.get("autoscaling") or {}) if autoscaling is None else autoscaling
    old_conditions = previous.get("conditions") or []
    conditions, not_ready = [], []
    for component in ["router", *roles]:
        ok, reason, message = component_condition(component, deployments.get(component))
        kind = CONDITION_TYPES[component]
        conditions.append(condition(kind, ok, reason, message, old_conditions, generation, now))
        if not ok:
            not_ready.append(f"{kind}: {message}")
    applied = applied_condition(failures, old_conditions, generation, now)
    if problems:
        ready = (False, "InvalidSpec", "; ".join(problems))
    elif applied and applied[0]["status"] == "False":
        ready = (False, "ApplyFailed", applied[0]["message"])
    elif not_ready:
        ready = (False, "ComponentsNotReady", "; ".join(not_ready))
    else:
        ready = (True, "AllComponentsReady", f"serving at {endpoint}")
    conditions.insert(0, condition("Ready", *ready, old_conditions, generation, now))
    conditions += applied + metrics_condition(autoscaling, old_conditions, generation, now)
    phase = "Failed" if problems else "Running" if ready[0] else "Pending"
    out = {
        "observedGeneration": generation,
        "phase": phase,
        "endpoint": endpoint,
        "router": replicas(deployments.get("router")),
        "pools": {role: replicas(deployments.get(role)) for role in roles},
        "conditions": conditions,
    }
    if autoscaling:
        out["autoscaling"] = autoscaling
    return out


def find(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})


def ready_condition(status: dict) -> dict:
    return find(status, "Ready")
