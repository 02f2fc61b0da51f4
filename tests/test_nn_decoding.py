"""LongNetLM: step-by-step decoding with the bounded cache equals the full forward; positions;
eager == compiled."""

import pytest
import torch

from dilated_compile import DilatedSpec, dilated_attention
from dilated_compile.nn import (
    DilatedKVCache,
    LongNetLM,
    RotaryEmbedding,
    XPos,
    dilated_attention_step,
)

F64 = torch.float64
# Nested segments, segments that do not divide one another, and the earlier ports' head layout.
PATTERNS = {
    "mixture": dict(segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4)),
    "unnested": dict(segment_lengths=(3, 5, 12), dilation_rates=(1, 2, 3)),
    "head_groups": dict(segment_lengths=(4, 8, 16, 16), dilation_rates=(1, 2, 4, 4), mode="head_groups"),
}


def _lm(pattern, positions="xpos", num_kv_heads=None, dtype=F64):
    torch.manual_seed(0)
    return LongNetLM(61, d_model=32, nhead=4, num_layers=2, dim_feedforward=48, **PATTERNS[pattern],
                     positions=positions, num_kv_heads=num_kv_heads, dtype=dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("positions,num_kv_heads", [("xpos", None), ("rotary", 2)])
@pytest.mark.parametrize("length,prompt", [(41, 6), (29, 1)])
def test_step_by_step_logits_equal_the_full_forward(pattern, positions, num_kv_heads, length, prompt):
    lm = _lm(pattern, positions, num_kv_heads)
    tokens = torch.randint(0, 61, (2, length), generator=torch.Generator().manual_seed(length))
    full = lm(tokens)
    cache = lm.new_cache()
    pieces = [lm.decode(tokens[:, :prompt], cache)]
    sizes = []
    for p in range(prompt, length):
        pieces.append(lm.decode(tokens[:, p : p + 1], cache))
        sizes.append(len(cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-11, atol=1e-11)
    assert cache.position == length
    # Bounded: the window of every config's current segment, never more than the largest one.
    assert max(sizes) < cache.capacity == max(PATTERNS[pattern]["segment_lengths"])
    assert min(sizes) < max(sizes)  # and it was trimmed when segments rolled over


def test_decoding_in_float32_and_chunks_after_the_prompt():
    lm = _lm("mixture", dtype=torch.float32)
    tokens = torch.randint(0, 61, (3, 50), generator=torch.Generator().manual_seed(0))
    cache = lm.new_cache()
    with torch.no_grad():
        pieces = [
            lm.decode(tokens[:, :10], cache),
            lm.decode(tokens[:, 10:23], cache),
            lm.decode(tokens[:, 23:], cache),
        ]
        full = lm(tokens)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.nbytes <= 2 * 2 * 3 * 16 * 32 * 4  # layers x (k, v) x B x window x E x 4 bytes


def test_generate_uses_the_cache_consistently():
    lm = _lm("unnested")
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    out = lm.generate(prompt, max_new_tokens=30, temperature=0)
    assert out.shape == (2, 35) and torch.equal(out[:, :5], prompt)
    # greedy: each new token is the argmax of the full forward on what precedes it
    torch.testing.assert_close(lm(out)[:, 4:-1].argmax(-1), out[:, 5:], rtol=0, atol=0)
    sampled = lm.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 13)


def test_one_query_step_is_the_ops_row():
    spec = DilatedSpec((4, 6, 16), (1, 2, 4))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 40, 8, generator=g, dtype=F64) for h in (6, 3, 3))
    full = dilated_attention(q, k, v, spec, is_causal=True, enable_gqa=True)
    cache = DilatedKVCache(spec)
    for p in range(40):
        cache.append(k[:, :, p : p + 1], v[:, :, p : p + 1])
        out = dilated_attention_step(
            q[:, :, p : p + 1], cache.key, cache.value, spec, position=p, start=cache.start
        )
        torch.testing.assert_close(out, full[:, :, p : p + 1], rtol=1e-12, atol=1e-12)
        cache.evict()
        assert len(cache) < 16
    with pytest.raises(ValueError, match="keys must end at the query's position 5"):
        dilated_attention_step(q[:, :, :1], k[:, :, :3], v[:, :, :3], spec, position=5, start=0)


def test_cache_misuse_is_refused():
    lm = _lm("mixture")
    other = _lm("unnested")
    with pytest.raises(ValueError, match="the cache is for DilatedSpec"):
        lm.decode(torch.zeros(1, 3, dtype=torch.long), other.new_cache())
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor \[batch, seq_len\]"):
        lm(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kind", ["rotary", "xpos"])
def test_positions_are_relative(kind):
    """q_p . k_t depends on p - t only (for xPos: within one block)."""
    embed = RotaryEmbedding(16) if kind == "rotary" else XPos(16, block=64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=F64), torch.randn(1, 1, 1, 16, generator=g, dtype=F64)

    def score(p, t):
        rq, _ = embed(q, q, torch.tensor([p]))
        _, rk = embed(k, k, torch.tensor([t]))
        return (rq * rk).sum().item()

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-9)
    assert score(130, 129) == pytest.approx(score(190, 189), rel=1e-9)
    if kind == "xpos":  # decays with distance, bounded exponents far into the sequence
        rq, rk = embed(torch.ones(1, 1, 1, 16), torch.ones(1, 1, 1, 16), torch.tensor([10**7]))
        assert torch.isfinite(rq).all() and torch.isfinite(rk).all()


def test_eager_equals_compiled_forward_and_backward():
    lm = _lm("mixture", num_kv_heads=2, dtype=torch.float32)
    tokens = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(0))
    params = list(lm.parameters())

    def run(model):
        logits = model(tokens)
        return logits, torch.autograd.grad(logits.logsumexp(-1).sum(), params)

    eager, eager_grads = run(lm)
    compiled, grads = run(torch.compile(lm, backend="dilated_compile_aot_eager", fullgraph=True))
    assert torch._dynamo.utils.counters["dilated_compile"]["sdpa_rewritten"] == 2  # one per layer
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_through_a_file(tmp_path):
    lm = _lm("mixture", num_kv_heads=2)
    torch.save(lm.state_dict(), tmp_path / "lm.pt")
    torch.manual_seed(1)  # other initial weights
    clone = LongNetLM(61, d_model=32, nhead=4, num_layers=2, dim_feedforward=48, **PATTERNS["mixture"],
                      num_kv_heads=2, dtype=F64)
    clone.load_state_dict(torch.load(tmp_path / "lm.pt"))
    tokens = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clone(tokens), lm(tokens), rtol=0, atol=0)
    assert not any("position" in key for key in lm.state_dict())  # positions hold no state
