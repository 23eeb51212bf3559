"""SplitInference status from its children and the autoscaler's record: pure functions, the clock
passed in. The only place that builds `status.conditions`."""

from __future__ import annotations

CONDITION_TYPES = {"router": "RouterReady", "prompt": "PromptPoolReady", "token": "TokenPoolReady",
                   "mixed": "MixedPoolReady"}
METRICS_CONDITION = "MetricsAvailable"
APPLIED_CONDITION = "ChildrenApplied"


def replicas(deployment: dict | None) -> dict:
    """Desired, updated (running the current template) and ready replicas of a Deployment, and the
    `ready/desired` text printed by kubectl."""
    if deployment is None:
        return {"replicas": 0, "updatedReplicas": 0, "readyReplicas": 0, "ready": "0/0"}
    desired = int((deployment.get("spec") or {}).get("replicas", 1))
    status = deployment.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    return {"replicas": desired, "updatedReplicas": int(status.get("updatedReplicas") or 0), "readyReplicas": ready,
            "ready": f"{ready}/{desired}"}


def rollout(deployment: dict | None) -> tuple[str, str, bool] | None:
    """None once a Deployment runs its current template everywhere (what `kubectl rollout status`
    waits for); else (reason, message, stale) where `stale` says old-template pods may still serve."""
    if deployment is None:
        return None
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < int(deployment["metadata"].get("generation") or 1):
        return "RollingOut", "the Deployment controller has not seen the new template yet", True
    progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {})
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        return "ProgressDeadlineExceeded", progressing.get("message") or "the rollout exceeded its deadline", True
    desired = int((deployment.get("spec") or {}).get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    if updated < desired:
        return "RollingOut", f"{updated} of {desired} replicas updated", True
    if total > updated:
        return "RollingOut", f"{total - updated} old replicas still running", True
    available = int(status.get("availableReplicas") or 0)
    if available < updated:
        return "RollingOut", f"{available} of {updated} updated replicas available", False
    return None


def progressing_condition(deployments: dict[str, dict | None], previous: list[dict], generation: int,
                          now: str) -> dict:
    """`Progressing`: True while rolling out and once done, False when a rollout exceeded its deadline
    (as a Deployment's own condition, so that Argo CD and Flux health checks read it)."""
    rolling = {component: r for component, d in deployments.items() if (r := rollout(d))}
    stuck = [f"{c}: {m}" for c, (reason, m, _) in rolling.items() if reason == "ProgressDeadlineExceeded"]
    if stuck:
        return condition("Progressing", False, "ProgressDeadlineExceeded", "; ".join(stuck), previous, generation, now)
    if rolling:
        return condition("Progressing", True, "RollingOut", "; ".join(f"{c}: {m}" for c, (_, m, _) in rolling.items()),
                         previous, generation, now)
    return condition("Progressing", True, "RolloutComplete", "every Deployment runs its current template",
                     previous, generation, now)


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
    progressing = progressing_condition({c: deployments.get(c) for c in ["router", *roles]}, old_conditions,
                                        generation, now)
    stale = [f"{c}: {r[1]}" for c in ["router", *roles] if (r := rollout(deployments.get(c))) and r[2]
             and deployments.get(c) and int((deployments[c].get("status") or {}).get("replicas") or 0) > 0]
    if problems:
        ready = (False, "InvalidSpec", "; ".join(problems))
    elif applied and applied[0]["status"] == "False":
        ready = (False, "ApplyFailed", applied[0]["message"])
    elif not_ready:
        ready = (False, "ComponentsNotReady", "; ".join(not_ready))
    elif stale:
        ready = (False, "RollingOut", "; ".join(stale))
    else:
        ready = (True, "AllComponentsReady", f"serving at {endpoint}")
    conditions.insert(0, condition("Ready", *ready, old_conditions, generation, now))
    conditions += [progressing, *applied] + metrics_condition(autoscaling, old_conditions, generation, now)
    phase = "Failed" if problems else "Running" if ready[0] else "Pending"
    images = {c: d["spec"]["template"]["spec"]["containers"][0].get("image") for c in ["router", *roles]
              if (d := deployments.get(c))}
    out = {
        "observedGeneration": generation,
        "phase": phase,
        "endpoint": endpoint,
        "router": replicas(deployments.get("router")),
        "pools": {role: replicas(deployments.get(role)) for role in roles},
        "conditions": conditions,
        "images": images,
    }
    if autoscaling:
        out["autoscaling"] = autoscaling
    return out


def find(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})


def ready_condition(status: dict) -> dict:
    return find(status, "Ready")
