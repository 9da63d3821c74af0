"""SpikeGuard's rule: z-score (or ratio) against the accepted history, after a warm-up; spikes do not
join the history; the state round-trips (checkpoints) and gives the same decisions."""

from __future__ import annotations

import json

import pytest

from xft_dist.train.guard import SpikeGuard


def _guard(**kw):
    return SpikeGuard(**({"window": 10, "warmup": 4, "zscore": 4.0, "ratio": None, "grad_norm": True} | kw))


def test_a_spike_is_judged_after_the_warmup_and_does_not_join_the_history():
    g = _guard()
    for x in (3.0, 2.9, 2.95, 2.85):
        assert g.check(x, 1.0) is None
    assert g.check(30.0, 1.0).startswith("loss 30 is")
    assert list(g.history["loss"]) == [3.0, 2.9, 2.95, 2.85] and g.spikes == 1
    assert g.check(2.8, 1.0) is None  # a falling loss is never a spike
    assert "grad_norm" in g.check(2.8, 50.0)


def test_no_judgement_during_warmup_and_ratio_rule():
    g = _guard(zscore=1e9, ratio=2.0)
    assert g.check(100.0, None) is None  # warm-up: joins the history
    for x in (1.0, 1.0, 1.0):
        g.check(x, None)
    assert "2 x the mean" in g.check(100.0, None)


def test_state_round_trips_through_json():
    a = _guard()
    for x in (3.0, 2.9, 2.95, 2.85, 40.0):
        a.check(x, 1.0)
    b = _guard()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    assert (a.check(35.0, 1.0) is None) == (b.check(35.0, 1.0) is None)


def test_config_checks_warmup_within_window():
    from xft_dist.config.load import validate

    with pytest.raises(Exception, match="warmup=30 must be <= train.spike.window=10"):
        validate({"data": {"shards": "x"}, "train": {"spike": {"warmup": 30, "window": 10}}})
