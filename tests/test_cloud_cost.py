"""Cost estimate: pinned price table x measured phase seconds, hand-computed expectations."""

from __future__ import annotations

import re

import pytest

from pgolf.cloud import cost
from pgolf.errors import ConfigError

# A record attempt on RunPod: 2 min boot, 3 min setup, 4 min data, 600 s train, 500 s eval, 1 min sync.
PHASES = {"provision": 120, "setup": 180, "data": 240, "train": 600, "eval": 500, "sync": 60}


def test_runpod_record_attempt_by_hand():
    est = cost.estimate_cost(PHASES, "runpod")
    # 1700 s = 0.47222 h x $21.52/h = $10.1622
    assert est["seconds"] == 1700
    assert est["usd"] == 10.16
    assert est["usd_per_hour"] == 21.52
    assert est["phases_usd"]["train"] == round(600 / 3600 * 21.52, 4) == 3.5867
    assert sum(est["phases_usd"].values()) == pytest.approx(10.1622, abs=1e-3)
    assert "parameter-golf" in est["source"]


def test_lambda_uses_its_catalog_price_and_case_is_ignored():
    est = cost.estimate_cost({"train": 3600}, " Lambda ")
    assert est["cloud"] == "lambda" and est["usd"] == 31.92


def test_unknown_cloud_gives_none_not_a_guess():
    est = cost.estimate_cost(PHASES, "aws")
    assert est["usd"] is None and est["usd_per_hour"] is None
    assert "no pinned price" in est["source"] and "usd_per_hour" in est["source"]
    assert est["seconds"] == 1700


def test_caller_price_overrides_the_table():
    est = cost.estimate_cost({"train": 1800}, "aws", usd_per_hour=55.0)
    assert est["usd"] == 27.5 and est["source"] == "given by the caller"


@pytest.mark.parametrize("phases", [{"train": -1}, {"train": float("nan")}, {"eval": float("inf")}])
def test_bad_durations_are_refused(phases):
    with pytest.raises(ConfigError, match="finite and >= 0"):
        cost.estimate_cost(phases, "runpod")


def test_bad_override_price_is_refused():
    with pytest.raises(ConfigError):
        cost.estimate_cost({"train": 1}, "runpod", usd_per_hour=-3)


def test_every_price_names_its_source_and_date():
    assert set(cost.PRICES) == {"runpod", "lambda"}
    for price in cost.PRICES.values():
        assert price.usd_per_hour > 0 and price.source and price.instance
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", price.as_of)


def test_read_phases_file(tmp_path):
    assert cost.read_phases_file(tmp_path / "absent.json") == {}
    good = tmp_path / "phases.json"
    good.write_text('{"setup": 181.0, "data": 240}')
    assert cost.read_phases_file(good) == {"setup": 181.0, "data": 240.0}
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        cost.read_phases_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        cost.read_phases_file(bad)


def test_format_usd():
    assert cost.format_usd(10.1622) == "$10.16"
    assert cost.format_usd(1234.5) == "$1,234.50"
    assert cost.format_usd(None) == "?"


def test_run_cost_joins_node_phases_with_measured_ones(tmp_path):
    phases = tmp_path / "phases.json"
    phases.write_text('{"setup": 180, "data": 240}')
    info = '{"cluster_name": "pgolf-ada-s1", "cloud": "RunPod", "region": "CA", "num_nodes": 1}'
    est = cost.run_cost({"train": 600, "eval": 500, "sync": 60}, phases, info)
    assert est["cloud"] == "runpod" and est["seconds"] == 1580
    assert est["usd"] == round(1580 / 3600 * 21.52, 2) == 9.44
    local = cost.run_cost({"train": 600}, None, None)
    assert local["cloud"] == "local" and local["usd"] is None
    assert cost.cloud_from_cluster_info("not json") is None
