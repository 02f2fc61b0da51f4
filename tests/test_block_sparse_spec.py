"""``BlockSparseSpec``: validation, identity, payloads, and the block layouts it stands for."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dilated_compile import BlockSparseSpec
from dilated_compile.attention_family import family_of_payload
from dilated_compile.ops._block_layout import build_block_index, random_key_blocks
from dilated_compile.testing import block_layout

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=0), "block_size must be >= 1, got 0"),
        (dict(block_size=True), "block_size must be an int, got True"),
        (dict(block_size=8, local_blocks=-1), "local_blocks must be >= 0, got -1"),
        (dict(block_size=8, global_blocks=1.5), "global_blocks must be an int"),
        (dict(block_size=8, random_blocks=-2), "random_blocks must be >= 0"),
        (dict(block_size=8, seed=2**31), r"seed must be < 2\*\*31"),
        (dict(block_size=8, local_blocks=None), "keeps no block"),
        (dict(block_size=8, layout=torch.ones(2, 2)), "layout must be a bool tensor"),
        (dict(block_size=8, layout=torch.ones(2, dtype=torch.bool)), r"layout must be \[H or 1, Mq, Mk\]"),
        (dict(block_size=8, layout=[[True]]), "layout must be a bool torch.Tensor"),
    ],
)
def test_bad_fields_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseSpec(**kwargs)


def test_fields_after_block_size_are_keyword_only():
    with pytest.raises(TypeError):
        BlockSparseSpec(128, 4)  # type: ignore[misc]


def test_equal_specs_hash_equal_and_layouts_compare_by_identity():
    a = BlockSparseSpec(64, local_blocks=1, global_blocks=2, random_blocks=3, seed=7)
    assert a == BlockSparseSpec(64, local_blocks=1, global_blocks=2, random_blocks=3, seed=7)
    assert hash(a) == hash(BlockSparseSpec(64, local_blocks=1, global_blocks=2, random_blocks=3, seed=7))
    assert a != BlockSparseSpec(64, local_blocks=1, global_blocks=2, random_blocks=3, seed=8)
    layout = torch.eye(4, dtype=torch.bool)
    with_layout = BlockSparseSpec(16, local_blocks=None, layout=layout)
    assert with_layout == BlockSparseSpec(16, local_blocks=None, layout=layout)  # the same tensor
    assert with_layout != BlockSparseSpec(16, local_blocks=None, layout=layout.clone())
    assert with_layout.layout.shape == (1, 4, 4)  # a 2-D layout serves every head
    assert len({a, with_layout, BlockSparseSpec(16, local_blocks=None, layout=layout)}) == 2


def test_payload_round_trips_and_never_holds_the_layout_values():
    spec = BlockSparseSpec(32, local_blocks=2, global_blocks=1, random_blocks=1, seed=5)
    payload = spec.to_json()
    assert json.loads(payload)["kind"] == "block_sparse"
    assert payload == json.dumps(json.loads(payload), sort_keys=True)
    assert family_of_payload(payload).from_json(payload, None) == spec
    layout = torch.rand(3, 5, 6) < 0.5
    with_layout = BlockSparseSpec(32, local_blocks=None, layout=layout)
    assert json.loads(with_layout.to_json())["layout"] == [3, 5, 6]
    assert BlockSparseSpec.from_json(with_layout.to_json(), with_layout.layout) == with_layout
    with pytest.raises(ValueError, match="disagree"):
        BlockSparseSpec.from_json(with_layout.to_json(), None)


def test_heads_and_lengths_a_layout_cannot_serve_raise():
    spec = BlockSparseSpec(8, local_blocks=None, layout=torch.ones(3, 4, 4, dtype=torch.bool))
    spec.check_num_heads(3)
    with pytest.raises(ValueError, match="layout has 3 heads but the query has 4"):
        spec.check_num_heads(4)
    spec.check_length(32)
    with pytest.raises(ValueError, match="covers fewer blocks than a sequence of 33 positions"):
        spec.check_length(33)


def test_the_example_layouts():
    band = block_layout(BlockSparseSpec(4, local_blocks=1), 1, 16)[0].int()
    assert band.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    glob = block_layout(BlockSparseSpec(4, local_blocks=None, global_blocks=1), 1, 13)[0]
    assert glob[0].all() and glob[:, 0].all() and glob[1:, 1:].sum() == 0
    causal = block_layout(BlockSparseSpec(4, local_blocks=2), 1, 16, is_causal=True)[0]
    assert not causal.triu(1).any()


# --------------------------------------------------------------------------------------------
# Random blocks
# --------------------------------------------------------------------------------------------


def test_random_draws_are_distinct_in_range_and_reproducible():
    rows = torch.arange(40)
    choices = torch.randint(0, 12, (40,), generator=torch.Generator().manual_seed(0))
    draws = random_key_blocks(11, 3, rows, choices, 5)
    again = random_key_blocks(11, 3, rows, choices, 5)
    assert torch.equal(draws, again)
    for h in range(3):
        for r in range(40):
            got = [d for d in draws[h, r].tolist() if d >= 0]
            assert len(got) == min(5, int(choices[r]))  # every choice when fewer than 5
            assert len(set(got)) == len(got)
            assert all(0 <= d < choices[r] for d in got)
    assert not torch.equal(draws[0], draws[1])  # each head its own draws
    assert not torch.equal(draws, random_key_blocks(12, 3, rows, choices, 5))


def test_random_draws_are_roughly_uniform():
    rows = torch.arange(4000)
    draws = random_key_blocks(3, 1, rows, torch.full((4000,), 10), 3)
    counts = torch.bincount(draws.flatten(), minlength=10).double()
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()


def test_causal_draws_do_not_depend_on_the_sequence_length():
    """A causal query block draws among the blocks it can see, so a longer sequence (a growing
    KV cache) leaves its random blocks where they were."""
    spec = BlockSparseSpec(4, local_blocks=None, random_blocks=2, seed=9)
    short = block_layout(spec, 2, 40, is_causal=True)
    long = block_layout(spec, 2, 80, is_causal=True)
    assert torch.equal(long[:, :10, :10], short)


# --------------------------------------------------------------------------------------------
# The compact index the implementations walk, against the layout built from the definition
# --------------------------------------------------------------------------------------------


def _dense_from_index(index, num_key_blocks):
    heads, rows, _ = index.kv_indices.shape
    dense = torch.zeros(heads, rows, num_key_blocks, dtype=torch.bool)
    for h in range(heads):
        for r in range(rows):
            count = int(index.kv_counts[h, r])
            if r < index.dense_rows:
                dense[h, r, :count] = True
            else:
                dense[h, r, index.kv_indices[h, r, :count].long()] = True
    return dense


def _random_spec(rng, num_heads, seq_len):
    bs = rng.choice([1, 2, 4, 8])
    local = rng.choice([None, 0, 1, 2])
    glob, rand = rng.choice([0, 1, 2]), rng.choice([0, 1, 3])
    layout = None
    if rng.random() < 0.3 or (local is None and not glob and not rand):
        m = -(-seq_len // bs) + rng.randint(0, 2)
        g = torch.Generator().manual_seed(rng.randint(0, 99))
        layout = torch.rand(rng.choice([1, num_heads]), m, m, generator=g) < 0.3
    return BlockSparseSpec(bs, local_blocks=local, global_blocks=glob, random_blocks=rand,
                           seed=rng.randint(0, 99), layout=layout)


@pytest.mark.parametrize("seed", range(4))
def test_index_lists_exactly_the_layouts_blocks(seed):
    rng = random.Random(seed)
    for _ in range(40):
        heads = rng.choice([1, 3])
        nk = rng.randint(1, 60)
        nq = rng.choice([nk, rng.randint(1, nk)])
        spec = _random_spec(rng, heads, nk)
        causal = rng.random() < 0.5
        index = build_block_index(
            spec.block_size, spec.local_blocks, spec.global_blocks, spec.random_blocks, spec.seed,
            spec.layout, heads, nq, nk, causal, CPU, transpose=True,
        )
        want = block_layout(spec, heads, nk, is_causal=causal)
        want = want[:, index.first_block : index.first_block + index.num_query_blocks]
        got = _dense_from_index(index, index.num_key_blocks).expand_as(want)
        assert torch.equal(got, want), (spec, nq, nk, causal)
        assert index.first_block == (nk - nq) // spec.block_size
        # Rows list ascending key blocks; the transposed lists hold every (non-global) row.
        for h in range(index.kv_indices.shape[0]):
            for j in range(index.num_key_blocks):
                rows = index.q_indices[h, index.q_ptr[h, j] : index.q_ptr[h, j + 1]].tolist()
                want_rows = [
                    r for r in range(index.dense_rows, index.num_query_blocks)
                    if j in index.kv_indices[h, r, : index.kv_counts[h, r]].tolist()
                ]
                assert rows == want_rows


def test_index_is_linear_in_the_sequence_length():
    """Without an explicit layout a row lists at most 2L + 1 + g + r blocks, global rows none."""
    spec = BlockSparseSpec(16, local_blocks=1, global_blocks=2, random_blocks=3)
    index = build_block_index(16, 1, 2, 3, 0, None, 4, 16 * 1024, 16 * 1024, False, CPU,
                              transpose=True)
    assert index.kv_indices.shape == (4, 1024, 3 + 2 + 3)
    assert index.q_indices.shape == (4, 1024 * 8)
    assert index.dense_rows == 2 and spec.num_blocks(16 * 1024) == 1024


def test_a_block_mask_whose_blocks_are_full_becomes_its_layout():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def band(b, h, q, k):
        return ((q // 32) - (k // 32)).abs() <= 1

    mask = flex.create_block_mask(band, None, None, 256, 256, device="cpu", BLOCK_SIZE=32)
    spec = BlockSparseSpec.from_block_mask(mask)
    assert spec.block_size == 32 and spec.local_blocks is None
    assert torch.equal(spec.layout[0], block_layout(BlockSparseSpec(32, local_blocks=1), 1, 256)[0])


def test_a_block_mask_with_partial_blocks_raises_naming_them():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def causal(b, h, q, k):
        return k <= q

    mask = flex.create_block_mask(causal, None, None, 128, 128, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match=r"partial blocks.*\(head 0, query block 0\).*is_causal=True"):
        BlockSparseSpec.from_block_mask(mask)
    with pytest.raises(TypeError, match="takes a FlexAttention BlockMask"):
        BlockSparseSpec.from_block_mask(torch.ones(2))
