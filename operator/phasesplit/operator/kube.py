"""A small JSON client for any Kubernetes kind, over the official client's authenticated transport."""

from __future__ import annotations

import json
import os

import kubernetes

PLURALS = {
    "ConfigMap": "configmaps", "Service": "services", "Secret": "secrets", "Event": "events",
    "PersistentVolumeClaim": "persistentvolumeclaims", "Deployment": "deployments",
    "NetworkPolicy": "networkpolicies", "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "ScaledObject": "scaledobjects", "SplitInference": "splitinferences", "Pod": "pods",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "CustomResourceDefinition": "customresourcedefinitions", "ClusterKopfPeering": "clusterkopfpeerings",
    "KopfPeering": "kopfpeerings",
}
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
TIMEOUT = (5, 30)  # seconds to connect, to read: a hung API server must not hang a handler


class KubeError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str):
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.message = _status_message(body) or f"HTTP {status}"


def _status_message(body: str) -> str:
    """The API server's own message from a `Status` answer ("" if there is none)."""
    try:
        return str(json.loads(body).get("message") or "")[:500]
    except (ValueError, AttributeError):
        return ""


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
         subresource: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(PLURALS[kind])
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def object_path(obj: dict, subresource: str | None = None) -> str:
    meta = obj["metadata"]
    return path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource)


class Kube:
    """get/create/merge-patch/list/delete by path; JSON in, JSON out; 404 on get is None."""

    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api = api_client

    @classmethod
    def from_environment(cls) -> Kube:
        """In a pod, its service account; elsewhere the kubeconfig ($KUBECONFIG, read now)."""
        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=config)
        return cls(kubernetes.client.ApiClient(config))

    def request(self, method: str, resource_path: str, body: object = None, content_type: str | None = None,
                query: list[tuple[str, str]] | None = None) -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        serialized = self.api.param_serialize(method, resource_path, query_params=query or [],
                                              header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(*serialized, _request_timeout=TIMEOUT)
        data = response.read() or b"{}"
        if not 200 <= response.status < 300:
            raise KubeError(response.status, method, resource_path, data.decode(errors="replace"))
        return json.loads(data)

    def get(self, resource_path: str) -> dict | None:
        try:
            return self.request("GET", resource_path)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        collection = path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return self.request("POST", collection, obj)

    def patch(self, resource_path: str, patch: dict, field_manager: str | None = None) -> dict:
        query = [("fieldManager", field_manager)] if field_manager else None
        return self.request("PATCH", resource_path, patch, MERGE_PATCH, query)

    def apply(self, obj: dict, field_manager: str) -> dict:
        """Server-side apply (forced: the operator is the authority for the fields it applies)."""
        return self.request("PATCH", object_path(obj), obj, APPLY_PATCH,
                            [("fieldManager", field_manager), ("force", "true")])

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None) -> list:
        query = [("labelSelector", label_selector)] if label_selector else []
        return self.request("GET", path(api_version, kind, namespace), query=query).get("items", [])

    def delete(self, resource_path: str) -> None:
        try:
            self.request("DELETE", resource_path)
        except KubeError as e:
            if e.status != 404:
                raise
