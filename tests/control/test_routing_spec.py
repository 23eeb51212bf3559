"""spec.router.routing: cacheAware by default, its knobs the router's defaults, passed as the router's flags by
the operator and local mode alike; a bad value is refused naming the field."""

import pytest
from support.serving import manifest

from phasesplit.control import spec as si
from phasesplit.local.plan import validate_manifest
from phasesplit.router.cache_routing import RoutingSettings
from phasesplit.router.main import build_parser, settings_from_args


def router_settings(routing: dict | None = None) -> RoutingSettings:
    doc = manifest("r", {"prompt": 1, "token": 1})
    if routing is not None:
        doc["spec"]["router"]["routing"] = routing
    flags = si.router_flags(validate_manifest(doc).spec)
    return settings_from_args(build_parser().parse_args(["--served-model-name", "m", *flags])).routing


def test_the_default_is_cache_aware_with_the_routers_own_defaults():
    assert router_settings() == RoutingSettings() and RoutingSettings().policy == "cacheAware"


def test_the_spec_reaches_the_router():
    got = router_settings({"policy": "leastLoaded", "cacheThreshold": 0.25, "balanceSlack": 2})
    assert got == RoutingSettings("leastLoaded", 0.25, 2)


@pytest.mark.parametrize(("routing", "field"), [
    ({"policy": "random"}, "spec.router.routing.policy"),
    ({"cacheThreshold": 2}, "spec.router.routing.cacheThreshold"),
    ({"balanceSlack": -1}, "spec.router.routing.balanceSlack")])
def test_a_bad_value_is_refused_naming_the_field(routing, field):
    with pytest.raises(ValueError) as refused:
        router_settings(routing)
    assert field in str(refused.value)
