import json

import numpy as np
import pytest

from dilated_compile import DilatedSpec, dilated


def test_fields_normalised_and_hashable():
    spec = DilatedSpec([2048, np.int64(4096)], (1, 2))
    assert spec.segment_lengths == (2048, 4096) and type(spec.segment_lengths[1]) is int
    assert spec.configs == ((2048, 1), (4096, 2))
    assert spec == DilatedSpec((2048, 4096), [1, 2])
    assert hash(spec) == hash(DilatedSpec((2048, 4096), [1, 2]))
    assert len({spec, DilatedSpec((2048, 4096), (1, 2), mode="head_groups")}) == 2
    with pytest.raises(AttributeError):
        spec.mode = "head_groups"


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        (dict(segment_lengths=(), dilation_rates=()), "segment_lengths", "()"),
        (dict(segment_lengths=(8, 16), dilation_rates=(1,)), "dilation_rates", "(1,)"),
        (dict(segment_lengths=(0,), dilation_rates=(1,)), "segment_lengths", "0"),
        (dict(segment_lengths=(8,), dilation_rates=(-1,)), "dilation_rates", "-1"),
        (dict(segment_lengths=(8,), dilation_rates=(16,)), "dilation_rates", "16"),
        (dict(segment_lengths=(8.0,), dilation_rates=(1,)), "segment_lengths", "8.0"),
        (dict(segment_lengths=(True,), dilation_rates=(1,)), "segment_lengths", "True"),
        (dict(segment_lengths="8", dilation_rates=(1,)), "segment_lengths", "'8'"),
        (dict(segment_lengths=(8,), dilation_rates=(1,), mode="mix"), "mode", "'mix'"),
    ],
)
def test_bad_fields_name_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as info:
        DilatedSpec(**kwargs)
    assert field in str(info.value) and value in str(info.value)


def test_json_payload_round_trip_matches_json_module():
    spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4), mode="head_groups")
    payload = spec.to_json()
    assert payload == json.dumps(json.loads(payload), sort_keys=True)
    assert DilatedSpec.from_json(payload) == spec
    with pytest.raises(ValueError, match="not a dilated-attention annotation"):
        DilatedSpec.from_json('{"kind": "block_sparse"}')


def test_head_groups_needs_a_head_per_config():
    spec = DilatedSpec((8, 16, 32), (1, 2, 4), mode="head_groups")
    spec.check_num_heads(3)
    with pytest.raises(ValueError, match="at least one query head per config: got 2 heads"):
        spec.check_num_heads(2)


def test_dilated_takes_a_spec_or_its_fields():
    spec = DilatedSpec((8,), (2,))
    assert dilated(spec).spec == spec
    assert dilated(segment_lengths=(8,), dilation_rates=(2,)).spec == spec
    with pytest.raises(TypeError, match="not both"):
        dilated(spec, segment_lengths=(8,))
    with pytest.raises(TypeError, match="mode='head_groups'"):
        dilated(spec, mode="head_groups")
    with pytest.raises(TypeError, match="needs a pattern"):
        dilated(segment_lengths=(8,))
    with pytest.raises(TypeError, match="must be a DilatedSpec"):
        dilated(((8,), (2,)))
    with pytest.raises(ValueError, match="dilation_rates"):
        dilated(segment_lengths=(8,), dilation_rates=(9,))
