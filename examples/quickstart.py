"""Quickstart: write SDPA, mark it dilated, compile, see the rewrite, check the numbers.

    python examples/quickstart.py

Runs on CPU in well under a minute.
"""

import time

import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import DilatedSpec, dilated
from dilated_compile.testing import dense_reference

# LongNet's pattern, scaled down: short segments attend densely, longer ones sparsely.
SPEC = DilatedSpec(segment_lengths=(64, 128, 256), dilation_rates=(1, 2, 4))


class CausalSelfAttention(torch.nn.Module):
    """Ordinary PyTorch attention; the only addition is the ``dilated(SPEC)`` region."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def project(self, x):  # [B, N, dim] -> 3 x [B, H, N, D]
        b, n, dim = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)

    def merge(self, y):  # [B, H, N, D] -> [B, N, dim]
        b, h, n, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x):
        q, k, v = self.project(x)
        with dilated(SPEC):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.merge(y)


def main():
    torch.manual_seed(0)
    model = CausalSelfAttention(dim=128, heads=8)
    x = torch.randn(2, 1000, 128)  # 1000 tokens: not a multiple of any segment length

    report = dilated_compile.explain(model, x)
    print("Rewrites made by the dilated_compile pass:")
    for rewrite in report.rewrites:
        print(f"  {rewrite}")

    compiled = dilated_compile.compile(model)  # = torch.compile(model, backend="dilated_compile")
    start = time.perf_counter()
    out = compiled(x)
    print(f"compiled in {time.perf_counter() - start:.1f} s")

    with torch.no_grad():
        q, k, v = model.project(x)
        attention = dense_reference(q.double(), k.double(), v.double(), SPEC, is_causal=True)
        reference = model.merge(attention.float())
        eager = model(x)
    error = (out - reference).abs().max().item()
    print(f"max |compiled - float64 dense reference| = {error:.2e} (float32)")
    print(f"max |compiled - eager|                   = {(out - eager).abs().max().item():.2e}")
    if error >= 1e-5:
        raise SystemExit(f"error {error:.2e} exceeds 1e-5")


if __name__ == "__main__":
    main()
