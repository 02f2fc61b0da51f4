"""``dilated_compile.apply`` on a plain PyTorch model: selection, per-module specs, removal,
errors, compilation and export. Numbers are checked against the float64 dense reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import DilatedSpec, dilated
from dilated_compile.apply_specs import AppliedSpecs, apply, register_region
from dilated_compile.ops import dilated_attention_op
from dilated_compile.testing import dense_reference

A = DilatedSpec(segment_lengths=(4, 8), dilation_rates=(1, 2))
B = DilatedSpec(segment_lengths=(2, 4), dilation_rates=(1, 2))
N = 19  # no multiple of any segment


class Attention(nn.Module):
    """Grouped-query self-attention through plain SDPA (the reference copy sets ``ref_spec``)."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.ref_spec = "sdpa"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if mask is not None:  # a key-padding mask, with the causal mask folded in
            mask = mask[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
        if self.ref_spec == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=True)
        else:
            spec = self.ref_spec or DilatedSpec((n,), (1,))  # None: dense
            out = dense_reference(q, k, v, spec, is_causal=mask is None, enable_gqa=True,
                                  attn_mask=mask).to(q.dtype)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm(x), mask)
        return x + self.mlp(x)


class Tiny(nn.Module):
    def __init__(self, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(dim) for _ in range(layers)])
        self.head = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x)


def make() -> Tiny:
    torch.manual_seed(0)
    return Tiny().double()


def reference(model: Tiny, specs) -> Tiny:
    """A copy whose layer i computes ``dense_reference`` with ``specs[i]`` (None: dense)."""
    ref = copy.deepcopy(model)
    for layer, spec in zip(ref.layers, specs):
        layer.attn.ref_spec = spec
    return ref


def inputs():
    torch.manual_seed(1)
    return torch.randn(2, N, 32, dtype=torch.float64)


def check(model, specs, x=None, mask=None):
    x = inputs() if x is None else x
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), reference(model, specs)(x, mask), atol=1e-10, rtol=1e-10)


def test_whole_model_and_removal():
    model = make()
    handle = apply(model, A)
    assert isinstance(handle, AppliedSpecs) and handle.specs == {"": A}
    check(model, [A, A])
    handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    check(model, [None, None])
    handle.remove()  # idempotent
    with apply(model, B):
        check(model, [B, B])
    check(model, [None, None])


def test_padding_mask_inside_regions():
    model = make()
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, :5] = False
    with apply(model, A):
        out = model(inputs(), mask)
    expected = reference(model, [A, A])(inputs(), mask)
    torch.testing.assert_close(out[mask], expected[mask], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "modules, specs",
    [
        ("layers.0", [A, None]),
        ("layers.1.*", [None, A]),
        ("*.attn", [A, A]),
        (Attention, [A, A]),
        (["layers.1", Attention], [A, A]),
    ],
    ids=["name", "glob", "suffix-glob", "type", "sequence"],
)
def test_modules_select(modules, specs):
    model = make()
    with apply(model, A, modules=modules) as handle:
        check(model, specs)
    assert "" not in handle.specs


def test_a_glob_selects_the_outermost_match_only():
    model = make()
    with apply(model, A, modules="layers.*") as handle:
        assert sorted(handle.specs) == ["layers.0", "layers.1"]  # not layers.0.attn, layers.0.mlp.0, ...


def test_mapping_gives_layers_their_own_specs():
    model = make()
    with apply(model, {"layers.0": A, "layers.1": B}):
        check(model, [A, B])


@pytest.mark.parametrize(
    "mapping",
    [{"*": A, "layers.1": B}, {"layers.*": A, "layers.1": B}, {"layers.*": A, "layers.1.attn": B}],
    ids=["deeper-module", "exact-name-beats-glob", "deeper-glob"],
)
def test_the_deeper_or_more_specific_match_wins(mapping):
    model = make()
    with apply(model, mapping):
        check(model, [A, B])


def test_equally_specific_selectors_with_different_specs_raise():
    with pytest.raises(ValueError, match="layers.1.*none of them is more specific"):
        apply(make(), {"layers.1*": A, "layers.*1": B})


def test_unknown_names_and_types_raise():
    model = make()
    with pytest.raises(ValueError, match=r"'blocks\.\*' matches no module name.*layers\.0"):
        apply(model, A, modules="blocks.*")
    with pytest.raises(ValueError, match="no module of the model is a MultiheadAttention.*Block"):
        apply(model, A, modules=nn.MultiheadAttention)
    with pytest.raises(ValueError, match="matches no module"):
        apply(model, {"layers.0": A, "decoder.*": B})
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_bad_arguments_raise():
    model = make()
    with pytest.raises(TypeError, match="either a .* mapping or a spec with modules"):
        apply(model, {"layers.0": A}, modules="layers.0")
    with pytest.raises(TypeError, match="must be a spec"):
        apply(model, (4, 8))
    with pytest.raises(TypeError, match="glob .* or a module type"):
        apply(model, A, modules=[3])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply(lambda x: x, A)


def test_a_model_without_sdpa_raises_at_its_first_forward():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    handle = apply(model, A, modules="0")
    message = r"no F.scaled_dot_product_attention call .*\[0 \(Linear\)\].*eager"
    with pytest.raises(RuntimeError, match=message):
        model(torch.randn(2, 8))
    assert not handle.active and "forward" not in model[0].__dict__
    model(torch.randn(2, 8))  # removed: runs as before


def test_multihead_attention_raises():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    model = Model().eval()
    with apply(model, A), pytest.raises(NotImplementedError, match="MultiheadAttention"):
        model(torch.randn(1, 10, 16))


def test_handles_come_off_in_reverse_order():
    model = make()
    first = apply(model, A)
    second = apply(model, B, modules="layers.1")
    check(model, [A, B])
    with pytest.raises(RuntimeError, match="reverse order"):
        first.remove()
    second.remove()
    check(model, [A, A])
    first.remove()
    check(model, [None, None])


def test_an_existing_instance_forward_is_kept_and_restored():
    model = make()
    own = model.layers[0].forward  # e.g. set by another library
    model.layers[0].forward = own
    with apply(model, A, modules="layers.0"):
        check(model, [A, None])
    assert model.layers[0].__dict__["forward"] is own


def test_a_deep_copy_of_an_applied_model_is_applied_to_itself():
    model = make()
    with apply(model, A, modules="layers.1"):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for p in clone.parameters():
                p.mul_(1.5)
        check(clone, [None, A])  # its own weights, its own regions
        check(model, [None, A])
    check(model, [None, None])


def test_an_applied_model_pickles(tmp_path):
    model = make()
    with apply(model, A, modules="layers.0"):
        torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    check(loaded, [A, None])


def test_other_spec_families_plug_in():
    class Pattern:  # a spec of another family: anything that opens a region
        def region(self):
            return dilated(B)

    class Registered:
        pass

    model = make()
    with apply(model, Pattern()):
        check(model, [B, B])
    register_region(Registered, lambda spec: dilated(A))
    with apply(model, Registered(), modules="layers.0"):
        check(model, [A, None])


def _compile_stats(model, x, backend):
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    return out, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def test_compiled_equals_eager_with_no_extra_graph_breaks():
    model = make().float()
    x = inputs().float()
    # Graph breaks are Dynamo's: the cheaper backend counts them as well as Inductor would.
    _, plain_breaks, plain_graphs = _compile_stats(model, x, "dilated_compile_aot_eager")
    with apply(model, {"*": A, "layers.1": B}):
        with torch.no_grad():
            eager = model(x)
        compiled, breaks, graphs = _compile_stats(model, x, "dilated_compile")
        assert counters["dilated_compile"]["sdpa_rewritten"] == 2
    assert (breaks, graphs) == (plain_breaks, plain_graphs)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_export_holds_the_dilated_op():
    model = make().float()
    x = inputs().float()
    with apply(model, {"layers.0": A, "layers.1": B}), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = dilated_compile.export(model, (x,))
        expected = model(x)
    calls = [n for n in program.graph.nodes if n.target == dilated_attention_op]
    assert [tuple(n.args[3]) for n in calls] == [A.segment_lengths, B.segment_lengths]
    torch.testing.assert_close(program.module()(x), expected, atol=1e-6, rtol=1e-6)


def test_a_model_compiled_before_apply_follows_it():
    model = make().float()
    x = inputs().float()
    compiled = torch.compile(model, backend="dilated_compile_aot_eager")
    with torch.no_grad():
        dense = compiled(x)
        with apply(model, A):
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(compiled(x), dense, atol=1e-3)
        torch.testing.assert_close(compiled(x), dense)
