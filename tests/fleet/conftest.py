import pytest

from phasesplit.fleet.perf import Profiles
from support.fleet_profiles import CATALOG, toy_rows, write_profile


@pytest.fixture
def toy_profiles(tmp_path):
    profile = write_profile(tmp_path / "toy.csv", toy_rows() + toy_rows("toy-big", 0.5, 5.0, tp=1))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    return Profiles(profile, catalog)
