"""Transferable / task-specific split of a UNet3D-style params dict."""

import numpy as np
import pytest

from timm_jax.core.partition import default_is_transferable, join, select_like, shape_mismatches, split


def params(cin=4, cout=3):
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    return {
        "conv_enc0_in": {"kernel": z(3, 3, 3, cin, 8), "bias": z(8)},
        "norm_enc0_in": {"scale": z(8), "bias": z(8)},
        "conv_dec0_loc2": {"kernel": z(1, 1, 1, 8, 8), "bias": z(8)},
        "head0": {"kernel": z(1, 1, 1, 8, cout), "bias": z(cout)},
    }


def test_split_by_name_and_round_trip():
    p = params()
    part = split(p)
    assert set(part.transferable) == {"conv_enc0_in", "conv_dec0_loc2"}
    assert set(part.task_specific) == {"norm_enc0_in", "head0"}
    assert part.mismatched == []
    joined = join(part.transferable, part.task_specific)
    assert joined.keys() == p.keys()
    for k in p:
        for leaf in p[k]:
            assert joined[k][leaf] is p[k][leaf]


def test_shape_mismatched_leaves_are_task_specific_and_reported():
    target, source = params(cin=4, cout=3), params(cin=2, cout=7)
    part = split(target, source)
    assert part.mismatched == ["conv_enc0_in/kernel", "head0/bias", "head0/kernel"]
    assert "kernel" not in part.transferable["conv_enc0_in"]
    assert part.task_specific["conv_enc0_in"]["kernel"].shape == (3, 3, 3, 4, 8)
    assert "bias" in part.transferable["conv_enc0_in"]  # same shape: still transferable
    assert shape_mismatches(target, target) == []
    # a source subset selected like the target's transferable part has the same structure
    sub = select_like(source, part.transferable)
    assert set(sub) == set(part.transferable)


def test_rule_and_errors():
    assert default_is_transferable(("conv_enc3_ctx1", "kernel"))
    assert not default_is_transferable(("head1", "kernel"))
    assert not default_is_transferable(("norm_dec0_up", "scale"))
    p = params()
    with pytest.raises(ValueError, match="conv_enc0_in/kernel appears in more than one part"):
        join(p, {"conv_enc0_in": {"kernel": 1}})
    with pytest.raises(KeyError, match="no leaf missing/kernel"):
        select_like(p, {"missing": {"kernel": 0}})


def test_flat_dict_round_trip():
    from timm_jax.core.partition import from_flat_dict, to_flat_dict

    p = params()
    flat = to_flat_dict(p)
    assert "conv_enc0_in/kernel" in flat and len(flat) == 8
    back = from_flat_dict(flat)
    assert back.keys() == p.keys() and back["head0"]["bias"] is p["head0"]["bias"]
