"""The chart's ValidatingAdmissionPolicies as the API server runs them: match the request, then
evaluate the policy's CEL (cel-python) over `object`, `oldObject`, `request` and its `variables`."""

from __future__ import annotations

import functools

import celpy

from support.rbac import NAMESPACE, RELEASE, render_chart

OPERATOR_USER = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"  # the chart's ServiceAccount


class Policy:
    def __init__(self, doc: dict):
        self.name = doc["metadata"]["name"]
        self.spec = doc["spec"]
        self.env = celpy.Environment()

    def matches(self, group: str, resource: str, operation: str) -> bool:
        return any(group in rule["apiGroups"] and resource in rule["resources"] and operation in rule["operations"]
                   for rule in self.spec["matchConstraints"]["resourceRules"])

    def refusals(self, old: dict, new: dict, username: str) -> list[str]:
        """The messages of the validations that refuse `old` -> `new` by `username` (none: admitted);
        an expression that fails to evaluate refuses, as failurePolicy Fail does."""
        activation = {"object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old),
                      "request": celpy.json_to_cel({"userInfo": {"username": username}})}
        if not all(self._true(c["expression"], activation) for c in self.spec.get("matchConditions", [])):
            return []
        variables = celpy.celtypes.MapType()
        for v in self.spec.get("variables", []):
            variables[celpy.celtypes.StringType(v["name"])] = self._run(v["expression"],
                                                                        {**activation, "variables": variables})
        activation["variables"] = variables
        return [v["message"] for v in self.spec["validations"] if not self._true(v["expression"], activation)]

    def _run(self, expression: str, activation: dict):
        return self.env.program(self.env.compile(expression)).evaluate(activation)

    def _true(self, expression: str, activation: dict) -> bool:
        try:
            result = self._run(expression, activation)
        except celpy.CELEvalError:
            return False
        return result is True or (isinstance(result, celpy.celtypes.BoolType) and bool(result))


@functools.cache
def chart_policies(*sets: str) -> tuple[Policy, ...]:
    """The ValidatingAdmissionPolicies the chart (with `sets`) installs, each with a Deny binding."""
    docs = render_chart(*sets)
    bound = {d["spec"]["policyName"] for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"
             and "Deny" in d["spec"]["validationActions"]}
    return tuple(Policy(d) for d in docs if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"] in bound)
