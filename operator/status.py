"""SplitInference status from its children: pure functions, the clock passed in."""

from __future__ import annotations

from phasesplit.operator import builders

CONDITION_TYPES = {"router": "RouterReady", "prompt": "PromptPoolReady", "token": "TokenPoolReady",
                   "mixed": "MixedPoolReady"}


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


def build_status(owner: builders.Owner, roles: list[str], endpoint: str, deployments: dict[str, dict | None],
                 problems: list[str], previous: dict, generation: int, now: str) -> dict:
    """The whole status; `deployments` maps "router" and each pool role to its live Deployment."""
    old_conditions = previous.get("conditions") or []
    conditions, not_ready = [], []
    for component in ["router", *roles]:
        ok, reason, message = component_condition(component, deployments.get(component))
        kind = CONDITION_TYPES[component]
        conditions.append(condition(kind, ok, reason, message, old_conditions, generation, now))
        if not ok:
            not_ready.append(f"{kind}: {message}")
    if problems:
        ready = (False, "InvalidSpec", "; ".join(problems))
    elif not_ready:
        ready = (False, "ComponentsNotReady", "; ".join(not_ready))
    else:
        ready = (True, "AllComponentsReady", f"serving at {endpoint}")
    conditions.insert(0, condition("Ready", *ready, old_conditions, generation, now))
    ours = {"Ready", *CONDITION_TYPES.values()}
    conditions += [c for c in old_conditions if c.get("type") not in ours]  # e.g. the autoscaler's
    phase = "Failed" if problems else "Running" if ready[0] else "Pending"
    return {
        "observedGeneration": generation,
        "phase": phase,
        "endpoint": endpoint,
        "router": replicas(deployments.get("router")),
        "pools": {role: replicas(deployments.get(role)) for role in roles},
        "conditions": conditions,
    }


def ready_condition(status: dict) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
