"""Forward-kernel variants for one dilated config on one GPU: which inner-loop change pays on
Hopper (H100/H200).

A stripped copy of the dilated forward kernel (one config, mixture offsets, no mask, no merge)
with its inner loop switchable: ``FMA`` applies the scale inside the exponent's fused
multiply-add, ``ACC_DOT`` accumulates the output inside the product, ``TMA`` loads the strided
dilated key/value rows through tensor descriptors (the copy engine, with the rate as the row
stride), ``WS`` asks Triton to warp-specialise the key loop. Each variant runs a few block
configs; each result is checked against float64 before it is timed, next to cuDNN on the same
segments (batched: rate 1 only) and on the full sequence. Usage::

    PYTHONPATH=. python benchmarks/forward_variants.py 65536
"""

import math
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from dilated_compile.ops._triton._common import _online_softmax_start
from dilated_compile.ops._triton.dilated_attention import _key_range, _segment_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under TRITON_INTERPRET=1
# Tensor descriptors built in a kernel need a scratch allocator.
triton.set_allocator(lambda size, align, stream: torch.empty(size, device=DEV, dtype=torch.int8))


@triton.jit
def _step(acc, l_i, m_i, q, k, v, cols, offs_m, n_rows, scale_log2, BOUNDS: tl.constexpr,
          IS_CAUSAL: tl.constexpr, FMA: tl.constexpr, ACC_DOT: tl.constexpr):
    raw = tl.dot(q, k)
    if BOUNDS:
        keep = cols[None, :] < n_rows
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        raw = tl.where(keep, raw, float("-inf"))
    if FMA:
        m_new = tl.maximum(m_i, tl.max(raw, 1) * scale_log2)
        p = tl.math.exp2(raw * scale_log2 - m_new[:, None])
    else:
        s = raw * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if ACC_DOT:
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def fwd_kernel(Q, K, V, Out, Lse, sqh, sqn, skh, skn, svh, svn, soh, son,
               N, seg_len, rate, num_heads, kv_group, scale_log2,
               HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, FMA: tl.constexpr,
               ACC_DOT: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    row0, n_rows = _segment_rows(seg, seg_len, N, h % rate, rate)
    if block * BLOCK_M >= n_rows:
        return
    kvh = h // kv_group
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < n_rows
    q_rows = row0 + offs_m * rate
    q = tl.load(Q + h * sqh + q_rows[:, None] * sqn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    k_base = K + kvh * skh + row0 * skn
    v_base = V + kvh * svh + row0 * svn
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[n_rows, HEAD_DIM], strides=[rate * skn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[n_rows, HEAD_DIM], strides=[rate * svn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    acc, l_i, m_i = _online_softmax_start(BLOCK_M, HEAD_DIM)
    full_end, hi = _key_range(block, n_rows, BLOCK_M, BLOCK_N, IS_CAUSAL)
    for start_n in tl.range(0, full_end, BLOCK_N, warp_specialize=WS):
        cols = start_n + offs_n
        if TMA:
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
        else:
            k = tl.load(k_base + cols[None, :] * (rate * skn) + offs_d[:, None])
            v = tl.load(v_base + cols[:, None] * (rate * svn) + offs_d[None, :])
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, cols, offs_m, n_rows, scale_log2,
                              False, IS_CAUSAL, FMA, ACC_DOT)
    for start_n in range(full_end, hi, BLOCK_N):
        cols = start_n + offs_n
        if TMA:
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
        else:
            n_valid = cols < n_rows
            k = tl.load(k_base + cols[None, :] * (rate * skn) + offs_d[:, None],
                        mask=n_valid[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * (rate * svn) + offs_d[None, :],
                        mask=n_valid[:, None], other=0.0)
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, cols, offs_m, n_rows, scale_log2,
                              True, IS_CAUSAL, FMA, ACC_DOT)
    out = acc / l_i[:, None]
    tl.store(Out + h * soh + q_rows[:, None] * son + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_valid[:, None])
    tl.store(Lse + h * N + q_rows, m_i + tl.math.log2(l_i), mask=m_valid)


def run(q, k, v, out, lse, w, r, causal, variant, cfg):
    bm, bn, warps, stages = cfg
    H, N, D = q.shape[1], q.shape[2], q.shape[3]
    grid = (triton.cdiv(-(-w // r), bm), triton.cdiv(N, w), H)
    fwd_kernel[grid](q, k, v, out, lse, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
                     v.stride(1), v.stride(2), out.stride(1), out.stride(2),
                     N, w, r, H, H // k.shape[1], (1 / math.sqrt(D)) * 1.4426950408889634,
                     HEAD_DIM=D, IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn,
                     num_warps=warps, num_stages=stages, **variant)


def reference_rows(q, k, v, w, r, causal, heads=(0, 5)):
    """float64 output of a few heads' first segment, config (w, r)."""
    outs = {}
    for h in heads:
        o = h % r
        rows = torch.arange(o, w, r, device=q.device)
        qq, kk, vv = (t[0, h, rows].double() for t in (q, k, v))
        s = qq @ kk.T / math.sqrt(q.shape[-1])
        if causal:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
        outs[h] = (rows, s.softmax(-1) @ vv)
    return outs


VARIANTS = {
    "base": dict(FMA=False, ACC_DOT=False, TMA=False, WS=False),
    "fma+accdot": dict(FMA=True, ACC_DOT=True, TMA=False, WS=False),
    "fma+accdot+tma": dict(FMA=True, ACC_DOT=True, TMA=True, WS=False),
    "fma+accdot+ws": dict(FMA=True, ACC_DOT=True, TMA=False, WS=True),
    "fma+accdot+tma+ws": dict(FMA=True, ACC_DOT=True, TMA=True, WS=True),
}
CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    H, D = 16, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    lse = torch.empty(1, H, N, device=DEV, dtype=torch.float32)
    rows = []
    t_start = time.time()
    for (w, r) in [(2048, 1), (16384, 8)]:
        for causal in (False, True):
            flops = 4 * H * (N // w) * (w // r) ** 2 * D * (0.5 if causal else 1)
            # cuDNN on the same dilated segments, as a batch (r = 1 only: contiguous segments)
            if r == 1:
                seg = lambda t: t.view(1, H, N // w, w, D).transpose(1, 2).reshape(N // w, H, w, D)
                qs, ks, vs = seg(q), seg(k), seg(v)
                t = do_bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal),
                             warmup=50, rep=200, return_mode="median")
                rows.append((w, r, causal, "cudnn-segments", "-", t, flops / t / 1e9))
            t = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                         warmup=50, rep=200, return_mode="median")
            full_flops = 4 * H * N * N * D * (0.5 if causal else 1)
            rows.append((w, r, causal, "cudnn-full-N", "-", t, full_flops / t / 1e9))
            ref = reference_rows(q, k, v, w, r, causal)
            for name, variant in VARIANTS.items():
                for cfg in CONFIGS:
                    if causal and cfg[0] % cfg[1]:
                        continue
                    try:
                        out.fill_(float("nan"))
                        run(q, k, v, out, lse, w, r, causal, variant, cfg)
                        torch.cuda.synchronize()
                        err = max(((out[0, h, rws].double() - o).norm() / o.norm()).item()
                                  for h, (rws, o) in ref.items())
                        if not err < 2e-2:
                            rows.append((w, r, causal, name, cfg, float("nan"), f"WRONG err={err:.2e}"))
                            continue
                        t = do_bench(lambda: run(q, k, v, out, lse, w, r, causal, variant, cfg),
                                     warmup=50, rep=200, return_mode="median")
                        rows.append((w, r, causal, name, cfg, t, flops / t / 1e9))
                    except Exception as e:  # noqa: BLE001
                        failure = f"ERR {type(e).__name__}: {str(e)[:80]}"
                        rows.append((w, r, causal, name, cfg, float("nan"), failure))
            print(f"[{time.time() - t_start:.0f}s] done w={w} r={r} causal={causal}", flush=True)
    print("w r causal variant config ms TFLOP/s")
    best = {}
    for row in rows:
        print(*row)
        if isinstance(row[6], float):
            key = (row[0], row[1], row[2], row[3])
            if key not in best or row[5] < best[key][5]:
                best[key] = row
    print("\nBEST per variant")
    for key, row in best.items():
        print(f"w={row[0]} r={row[1]} causal={int(row[2])} {row[3]:<20} {row[4]} "
              f"{row[5]:.3f} ms {row[6]:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
