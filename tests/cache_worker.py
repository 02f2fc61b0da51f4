"""Compiles one annotated function with the "dilated_compile" backend and prints, as JSON, its
error against the float64 reference and Inductor's FX-graph-cache hits and misses.

Run by test_cache_safety.py in fresh processes that share TORCHINDUCTOR_CACHE_DIR; the spec comes
from the command line, so every process traces the same code with only the spec changed.
"""

import json
import sys

import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import DilatedSpec, dilated
from dilated_compile.testing import dense_reference

SPEC = DilatedSpec(*json.loads(sys.argv[1]))


def attend(q, k, v):
    with dilated(SPEC):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def main():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 8, generator=g) for _ in range(3))
    out = dilated_compile.compile(attend, fullgraph=True)(q, k, v)
    error = (out.double() - dense_reference(q, k, v, SPEC, is_causal=True)).abs().max().item()
    stats = torch._dynamo.utils.counters["inductor"]
    print(json.dumps({"error": error, "hits": stats["fxgraph_cache_hit"],
                      "misses": stats["fxgraph_cache_miss"]}))


if __name__ == "__main__":
    main()
