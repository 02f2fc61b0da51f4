"""Train a small LongNetLM on a long-range recall task, and the same model restricted to its
shortest segment, to see what the longer dilated segments buy.

    pip install -e ".[examples]"              # matplotlib and tqdm
    python examples/train_longnet.py          # CPU: a few minutes
    python examples/train_longnet.py --device cuda --steps 2000   # larger defaults on a GPU

The task: each sequence opens with a key token (one of ``--num-keys``), followed by noise tokens;
at random positions a query marker asks for the key, and the model must output it there. Every
query lies beyond the first segment of the shortest config, so a model that attends only inside
segments of that length never sees the key (segments never overlap, however many layers) and
stays at chance, ``1 / num_keys``. LongNet's longer, dilated segments reach back to the key, so
the LongNet configuration — the same model, same data — learns the task.

At the end it prints held-out accuracies, the tokens/s of a training step in eager mode and
compiled with ``backend="dilated_compile"``, and saves the loss and accuracy curves as a PNG.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

import dilated_compile  # noqa: F401  (registers the "dilated_compile" backend)
from dilated_compile.nn import LongNetLM

IGNORE = -100

# Defaults per device: (seq_len, d_model, heads, layers, ffn, batch, steps, lr).
SIZES = {
    "cpu": dict(seq_len=256, d_model=64, heads=4, layers=2, ffn=128, batch_size=32, steps=300, lr=3e-3),
    "cuda": dict(seq_len=4096, d_model=256, heads=8, layers=4, ffn=1024, batch_size=16, steps=1500, lr=1e-3),
    "tiny": dict(seq_len=64, d_model=32, heads=4, layers=2, ffn=64, batch_size=8, steps=20, lr=3e-3),
}


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Sequences ``[key, noise..., QUERY, noise..., QUERY, ...]``: at each query marker the target
    is the key of position 0. Tokens: keys ``[0, num_keys)``, noise ``[num_keys, query)``, the
    marker ``query``."""

    seq_len: int
    num_keys: int = 8
    num_noise: int = 16
    first_query: int = 16  # no query before this position
    query_rate: float = 1 / 16

    @property
    def query(self) -> int:
        return self.num_keys + self.num_noise

    @property
    def vocab_size(self) -> int:
        return self.query + 1

    def batch(self, batch_size: int, generator: torch.Generator, device: torch.device):
        """``tokens`` ``[B, N]`` and ``targets`` ``[B, N]`` (``IGNORE`` except at the markers)."""
        keys = torch.randint(0, self.num_keys, (batch_size, 1), generator=generator)
        tokens = torch.randint(self.num_keys, self.query, (batch_size, self.seq_len), generator=generator)
        tokens[:, :1] = keys
        asks = torch.rand(batch_size, self.seq_len, generator=generator) < self.query_rate
        asks[:, : self.first_query] = False
        tokens[asks] = self.query
        targets = torch.where(asks, keys.expand_as(tokens), torch.full_like(tokens, IGNORE))
        return tokens.to(device), targets.to(device)


def make_model(args, task: RecallTask, segment_lengths, dilation_rates, device) -> LongNetLM:
    return LongNetLM(
        task.vocab_size, d_model=args.d_model, nhead=args.heads, num_layers=args.layers,
        dim_feedforward=args.ffn, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
        positions="xpos", device=device,
    )


def loss_and_accuracy(model, tokens, targets):
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    asked = targets != IGNORE
    accuracy = (logits.argmax(-1)[asked] == targets[asked]).float().mean()
    return loss, accuracy


def progress(iterable, description: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # plain printing without tqdm
        return None, iterable
    bar = tqdm(iterable, desc=description, dynamic_ncols=True)
    return bar, bar


def train(name: str, model: LongNetLM, task: RecallTask, args, device) -> dict:
    """Train ``model``; the same data stream for every model (one seed)."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                   pct_start=0.1)
    history = {"loss": [], "accuracy": []}
    bar, steps = progress(range(args.steps), f"{name:>22}")
    start = time.perf_counter()
    model.train()
    for step in steps:
        tokens, targets = task.batch(args.batch_size, generator, device)
        loss, accuracy = loss_and_accuracy(model, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history["loss"].append(loss.item())
        history["accuracy"].append(accuracy.item())
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy.item():.2f}")
        elif step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"{name}: step {step:5d}  loss {loss.item():.3f}  accuracy {accuracy.item():.2f}")
    history["seconds"] = time.perf_counter() - start
    history["eval_loss"], history["eval_accuracy"] = evaluate(model, task, args, device)
    return history


@torch.no_grad()
def evaluate(model, task: RecallTask, args, device, batches: int = 8) -> tuple[float, float]:
    """Loss and accuracy on held-out sequences (another seed)."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    model.eval()
    losses, accuracies = [], []
    for _ in range(batches):
        loss, accuracy = loss_and_accuracy(model, *task.batch(args.batch_size, generator, device))
        losses.append(loss.item())
        accuracies.append(accuracy.item())
    model.train()
    return sum(losses) / batches, sum(accuracies) / batches


def tokens_per_second(model, task: RecallTask, args, device, backend: str | None) -> tuple[float, float]:
    """Training-step throughput (forward, backward, optimizer) of a copy of ``model``, eager
    (``backend=None``) or compiled; and the time of the first (compiling) step."""
    model = copy.deepcopy(model)
    step_fn = model if backend is None else torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(args.seed + 2)
    batches = [task.batch(args.batch_size, generator, device) for _ in range(args.timing_steps + 1)]

    def step(tokens, targets):
        loss, _ = loss_and_accuracy(step_fn, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step(*batches[0])
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for tokens, targets in batches[1:]:
        step(tokens, targets)
    sync()
    seconds = time.perf_counter() - start
    return args.timing_steps * args.batch_size * task.seq_len / seconds, first


def plot(histories: dict, task: RecallTask, path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[examples]'): no plot")
        return False

    def smooth(values, window=10):
        out, total = [], 0.0
        for i, v in enumerate(values):
            total += v - (values[i - window] if i >= window else 0.0)
            out.append(total / min(i + 1, window))
        return out

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, history), color in zip(histories.items(), ("tab:blue", "tab:red")):
        ax_loss.plot(history["loss"], color=color, alpha=0.25, linewidth=0.8)
        ax_loss.plot(smooth(history["loss"]), color=color, label=name)
        ax_acc.plot(smooth(history["accuracy"]), color=color, label=name)
    chance_loss = math.log(task.num_keys)
    ax_loss.axhline(chance_loss, color="gray", linestyle="--", label=f"chance: ln {task.num_keys}")
    ax_acc.axhline(1 / task.num_keys, color="gray", linestyle="--", label=f"chance: 1/{task.num_keys}")
    ax_loss.set(
        xlabel="step", ylabel="cross-entropy at the query markers", title="training loss", ylim=(0, None)
    )
    ax_acc.set(
        xlabel="step", ylabel="accuracy at the query markers", title="training accuracy", ylim=(0, 1.02)
    )
    for ax, where in ((ax_loss, "upper right"), (ax_acc, "center right")):
        ax.grid(alpha=0.3)
        ax.legend(loc=where)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizes of the task, the model and the training (None: the size preset's value)."""
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--steps", type=int, help="training steps per model")
    parser.add_argument("--seq-len", type=int, help="sequence length N (a multiple of 16)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--ffn", type=int, help="feed-forward width")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--num-keys", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    add_task_arguments(parser)
    parser.add_argument("--out", default="train_longnet.png", help="where to save the plot")
    parser.add_argument(
        "--compile-backend",
        default="dilated_compile",
        help="backend of the compiled throughput run ('none' to skip it)",
    )
    parser.add_argument("--timing-steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = SIZES["tiny" if args.tiny else ("cuda" if args.device.startswith("cuda") else "cpu")]
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seq_len % 16:
        parser.error(f"--seq-len must be a multiple of 16, got {args.seq_len}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    n = args.seq_len
    # LongNet's geometric pattern: segments N/16, N/4, N with rates 1, 2, 4.
    longnet = ((n // 16, n // 4, n), (1, 2, 4))
    shortest = ((n // 16,), (1,))
    task = RecallTask(seq_len=n, num_keys=args.num_keys, first_query=n // 16)
    print(
        f"recall task: N={n}, {task.num_keys} keys, queries after position {task.first_query}; model "
        f"d_model={args.d_model}, {args.heads} heads, {args.layers} layers; {args.steps} steps of "
        f"{args.batch_size} sequences on {device}"
    )
    names = {
        f"LongNet w={longnet[0]} r={longnet[1]}": longnet,
        f"shortest segment only w={shortest[0]}": shortest,
    }
    histories, models = {}, {}
    for name, (segments, rates) in names.items():
        torch.manual_seed(args.seed)  # the same initial weights where the shapes agree
        models[name] = make_model(args, task, segments, rates, device)
        histories[name] = train(name, models[name], task, args, device)

    header = ("model", "final train loss", "held-out loss", "held-out accuracy", "time")
    print("\n{:<40} {:>16} {:>14} {:>18} {:>7}".format(*header))
    for name, history in histories.items():
        final = sum(history["loss"][-10:]) / len(history["loss"][-10:])
        print(
            f"{name:<40} {final:16.3f} {history['eval_loss']:14.3f} {history['eval_accuracy']:18.1%} "
            f"{history['seconds']:6.0f}s"
        )
    chance = math.log(task.num_keys)
    print(f"{'chance':<40} {chance:16.3f} {chance:14.3f} {1 / task.num_keys:18.1%}")

    title = (
        f"Recall of a key {task.first_query}-{n - 1} tokens back (N={n}): LongNet vs shortest segment only"
    )
    if plot(histories, task, args.out, title):
        print(f"\nsaved the loss curves to {args.out}")

    results = {"histories": histories}
    longnet_model = models[next(iter(names))]
    eager, _ = tokens_per_second(longnet_model, task, args, device, None)
    results["eager_tokens_per_s"] = eager
    line = f"\ntraining-step throughput of the LongNet model: eager {eager:,.0f} tokens/s"
    if args.compile_backend != "none":
        compiled, first = tokens_per_second(longnet_model, task, args, device, args.compile_backend)
        results["compiled_tokens_per_s"] = compiled
        line += (
            f", compiled (backend={args.compile_backend!r}) {compiled:,.0f} tokens/s "
            f"({compiled / eager:.2f}x; first step, compiling, {first:.0f}s)"
        )
    print(line)
    return results


if __name__ == "__main__":
    main()
