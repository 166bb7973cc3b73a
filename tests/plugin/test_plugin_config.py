"""MemFlowConfig: reference defaults, strictness, and errors that name what was wrong."""

import pytest

from plugin import MemFlowConfig


def test_defaults_follow_the_reference():
    cfg = MemFlowConfig()
    assert (cfg.k, cfg.keep_newest, cfg.record_interval, cfg.record_frame, cfg.scorer) == (3, 1, 3, 0, "nam")
    assert cfg.memory_frames == 3
    assert MemFlowConfig(enabled=False).memory_frames == 0
    assert MemFlowConfig(adaptive_k="gap", k_min=1, k_max=5).memory_frames == 5


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown MemFlowConfig key\(s\) \['kk'\]"):
        MemFlowConfig.from_dict({"kk": 3})
    assert MemFlowConfig.from_dict({"k": 4}).k == 4
    assert MemFlowConfig().replace(prefetch=True).prefetch is True


@pytest.mark.parametrize("changes, message", [
    ({"scorer": "clip"}, "scorer is 'clip'; expected one of nam, embedding"),
    ({"k": 0}, "k must be an int >= 1, got 0"),
    ({"k_min": 4, "k_max": 2, "adaptive_k": "gap"}, r"k_min \(4\) must be <= k_max \(2\)"),
    ({"keep_newest": 4}, r"keep_newest \(4\) must be <= k \(3\)"),
    ({"write_policy": "grow"}, "write_policy is 'grow'"),
    ({"deadline_s": 0}, "deadline_s must be > 0"),
    ({"max_entries": 0}, "max_entries must be an int >= 1"),
    ({"prefetch": "yes"}, "must be bools"),
])
def test_bad_values_say_what_was_received(changes, message):
    with pytest.raises(ValueError, match=message):
        MemFlowConfig(**changes)


def test_config_is_frozen():
    with pytest.raises(Exception):
        MemFlowConfig().k = 5
