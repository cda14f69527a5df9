"""Replays every scenarios/*.yaml file end to end (namespaces, real agents, a manager).

By hand: `python3 tests/scenario_runner.py scenarios/NAME.yaml [--keep] [--debug]`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from netns import require_netns
from scenario_runner import ScenarioError, load, parse_size, run_scenario, stream_digest

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))


def test_scenario_files_are_well_formed() -> None:
    assert SCENARIOS, "no scenario files found"
    for path in SCENARIOS:
        spec = load(path)
        assert spec["manager"]["ns"] in spec["namespaces"], path
        assert isinstance(spec["steps"], list) and spec["steps"], path
        assert float(spec.get("timeout", 120)) <= 180, f"{path}: keep each scenario short"


def test_runner_helpers() -> None:
    assert parse_size("256M") == 256 << 20
    assert parse_size("64k") == 64 << 10
    assert parse_size(7) == 7
    with pytest.raises(ValueError):
        parse_size("lots")
    # the stream is deterministic per seed and differs between seeds
    assert stream_digest(1, 300_000) == stream_digest(1, 300_000)
    assert stream_digest(1, 300_000) != stream_digest(2, 300_000)


def test_missing_key_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"namespaces": {"mgr": {}}, "steps": []}))
    with pytest.raises(ScenarioError, match="manager"):
        load(bad)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path) -> None:
    require_netns()
    run_scenario(path)
