"""A Hugging Face Llama with dilated attention on one CUDA GPU, checked against float64.

What a new user does: a ``LlamaForCausalLM`` from a config (random weights, head dim 64 so the
Triton kernels run, grouped-query heads), ``dilated_compile.apply(model, spec)``, then

1. a left-padded batch: logits on the GPU (float32 and bfloat16, the kernels with transformers'
   causal + padding mask) against the same model in float64 on the CPU (the exact PyTorch
   implementation), on the real tokens;
2. one training step: the gradients of every parameter against float64;
3. ``torch.compile(model, backend="dilated_compile")`` against eager;
4. greedy ``generate`` with ``DilatedCache`` against the default cache, token for token, and the
   tokens the bounded cache holds.

It also counts the kernel launches that received a mask, so a run that silently fell back to
the PyTorch implementation fails. Usage::

    DILATED_COMPILE_AUTOTUNE=0 PYTHONPATH=. python benchmarks/gpu_hf_check.py
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dilated_compile
from dilated_compile import DilatedSpec
from dilated_compile.integrations.transformers import DilatedCache
from dilated_compile.ops._triton import dilated_attention as kernels

SPEC = DilatedSpec(segment_lengths=(64, 128, 256), dilation_rates=(1, 2, 4))
VOCAB, LENGTH, PADS = 512, 700, (37, 0, 300)


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        attention_dropout=0.0, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def padded_batch(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(PADS), LENGTH), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(PADS):  # left padding, as generate wants it
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids.to(device), mask.to(device)


def logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def rel_err(got, want, keep) -> float:
    got, want = got[keep].double().cpu(), want[keep].double().cpu()
    return ((got - want).norm() / want.norm()).item()


class KernelCalls:
    """Counts the Triton forward launches made with and without a mask."""

    def __init__(self):
        self.masked = self.unmasked = 0
        self._forward = kernels.forward

    def __enter__(self):
        def counted(*args, **kwargs):
            mask = args[8] if len(args) > 8 else kwargs.get("attn_mask")
            if mask is None:
                self.unmasked += 1
            else:
                self.masked += 1
            return self._forward(*args, **kwargs)

        kernels.forward = counted
        return self

    def __exit__(self, *exc):
        kernels.forward = self._forward


def main():
    import transformers

    results = {}
    base = make_model()
    reference = copy.deepcopy(base).double()
    dilated_compile.apply(reference, SPEC)
    ids_cpu, mask_cpu = padded_batch("cpu")
    keep = mask_cpu.bool()
    want = logits(reference, ids_cpu, mask_cpu)

    ids, mask = padded_batch("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to("cuda", dtype)
        dilated_compile.apply(model, SPEC)
        with torch.no_grad(), KernelCalls() as calls:
            got = logits(model, ids, mask)
        assert calls.masked > 0, "the kernels never saw transformers' mask"
        results[f"logits {dtype} vs float64"] = rel_err(got, want, keep)
        results[f"kernel launches with a mask ({dtype})"] = calls.masked

    # One training step in float32: every parameter's gradient against float64.
    model = copy.deepcopy(base).to("cuda")
    dilated_compile.apply(model, SPEC)
    labels = ids.masked_fill(mask == 0, -100)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
    ref_labels = ids_cpu.masked_fill(mask_cpu == 0, -100)
    reference(input_ids=ids_cpu, attention_mask=mask_cpu, position_ids=(mask_cpu.cumsum(-1) - 1).clamp_min(0),
              labels=ref_labels).loss.backward()
    worst = 0.0
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        worst = max(worst, ((p.grad.double().cpu() - r.grad).norm() / r.grad.norm()).item())
    results["grads float32 vs float64 (worst parameter)"] = worst

    # Compiled against eager, float32.
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    compiled = torch.compile(model, backend="dilated_compile")
    with torch.no_grad():
        eager_out = logits(model, ids, mask)
        compiled_out = logits(compiled, ids, mask)
    results["compile + first call s"] = time.perf_counter() - start
    results["compiled vs eager"] = rel_err(compiled_out, eager_out, keep.cuda())

    # Greedy generation: DilatedCache against the default cache.
    prompt_ids, prompt_mask = ids[:, :300], mask[:, :300]
    prompt_mask[:, -1] = 1  # every row has a last real token to continue from
    common = dict(attention_mask=prompt_mask, max_new_tokens=300, do_sample=False)
    with torch.no_grad():
        default = model.generate(prompt_ids, **common)
        cache = DilatedCache(SPEC)
        bounded = model.generate(prompt_ids, past_key_values=cache, **common)
    results["generate: DilatedCache == default cache"] = bool(torch.equal(default, bounded))
    results["generate: tokens held per layer (period)"] = f"{cache.layers[0].num_held} ({cache.period})"

    meta = (f"device={torch.cuda.get_device_name()} torch={torch.__version__} "
            f"transformers={transformers.__version__} date={time.strftime('%Y-%m-%d')}")
    print(meta)
    print("| check | result |\n|---|---|")
    for name, value in results.items():
        shown = f"{value:.2e}" if isinstance(value, float) and name != "compile + first call s" else value
        if name == "compile + first call s":
            shown = f"{value:.1f}"
        print(f"| {name} | {shown} |")
    assert results["logits torch.float32 vs float64"] < 1e-4
    assert results["grads float32 vs float64 (worst parameter)"] < 1e-3
    assert results["compiled vs eager"] < 1e-4
    assert results["generate: DilatedCache == default cache"]


if __name__ == "__main__":
    main()
