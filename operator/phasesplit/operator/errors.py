"""A failed reconcile in kopf's terms: what can heal by itself is a `kopf.TemporaryError` (kopf
runs the handler again after `delay`, doubled on each retry), what cannot is a `kopf.PermanentError`
(kopf stops retrying until the spec changes).

| the API server answered                         | error     | why                                        |
|-------------------------------------------------|-----------|--------------------------------------------|
| 409 Conflict                                    | temporary | a race with another writer                 |
| 429 TooManyRequests                             | temporary | the server's rate limit                    |
| 5xx (a webhook not ready, an etcd timeout)      | temporary | the server, or what it calls, is not ready |
| nothing (connection refused, timed out)         | temporary | the server is restarting or unreachable    |
| 400 BadRequest, 422 Invalid, any other 4xx      | permanent | the object as built is refused             |
| 403 Forbidden (RBAC, a quota)                   | permanent | an administrator must act                  |
| 404 NotFound (a kind not installed: KEDA's CRD) | permanent | an administrator must act                  |

A permanent error still meets the periodic resync (`handlers.RESYNC_SECONDS`), so a CRD installed
or a Role fixed later is picked up without a spec change.
"""

from __future__ import annotations

import kopf
import urllib3

from phasesplit.operator.kube import KubeError

RETRY_DELAY = 1.0  # seconds before the first retry of a transient failure
MAX_RETRY_DELAY = 30.0
TRANSIENT_STATUSES = {409, 429}  # and every 5xx
API_ERRORS = (KubeError, urllib3.exceptions.HTTPError)  # refused by the server; never answered
HandlerError = kopf.TemporaryError | kopf.PermanentError


def transient(status: int | None) -> bool:
    """Whether a request answered `status` (None: no answer) may succeed if sent again soon."""
    return status is None or status in TRANSIENT_STATUSES or status >= 500


def retry_delay(retry: int) -> float:
    return min(RETRY_DELAY * 2**retry, MAX_RETRY_DELAY)


def handler_error(message: str, heals: bool, retry: int) -> HandlerError:
    """What a handler raises for a failure; `retry`: kopf's count of the handler's earlier tries."""
    if heals:
        return kopf.TemporaryError(message, delay=retry_delay(retry))
    return kopf.PermanentError(message)


def from_failures(failures: list[str], statuses: list[int], retry: int) -> HandlerError:
    """Children the server refused in one pass: temporary if any may heal (the retry applies them all)."""
    return handler_error("; ".join(failures), any(transient(status) for status in statuses), retry)


def from_exception(e: Exception, retry: int) -> HandlerError:
    """A whole pass that failed (one of API_ERRORS): a request the server refused, or never answered."""
    if isinstance(e, KubeError):
        return handler_error(str(e), transient(e.status), retry)
    return handler_error(f"the API server did not answer: {e}", True, retry)
