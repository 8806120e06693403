"""Log-probs at label positions (`lm_head.LabelLogps`) against the full logits, on one device:
the same sums and gradients, and what each costs in time and peak memory.

A randomly initialised Llama (tied head, fp32 master weights) scores a batch of right-padded
sequences with a prompt of their own length each, two ways, under the run's precision (bf16
autocast on a GPU, fp32 on CPU): `batch_logps` (hidden states at label positions, chunked LM
head) and one forward to the (B, T, V) logits scored by `sequence_logps`, the pure reference.
Each is timed over forward + backward of a per-sequence weighted sum (as the DPO loss weighs
its sequences), after a warm-up, with a device synchronize around each repetition; GPU peak
memory is `torch.cuda.max_memory_allocated` above what the model and its gradients hold.

    python bench/label_logps_check.py                       # GPU if there is one: 340m shape
    python bench/label_logps_check.py --device cpu --hidden 256 --layers 2 --vocab 8192

Exits 1 when the two disagree beyond the tolerance of the precision, |Δ| ≤ atol + rtol·|sum|
on each sequence's log-prob sum (fp32: 1e-4 + 1e-6·|sum|, GEMMs blocked by another row count
round otherwise; bf16: 2e-2 + 1e-4·|sum|, a logit rounded to the other side of a bf16 step
moves a sum by up to one step) and max |Δ grad| over each parameter's largest gradient
(fp32 1e-4, bf16 2e-2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.lm_head import lm_head_of
from pipeline.logps import batch_logps, sequence_logps

Score = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def make_batch(rows: int, width: int, vocab: int, device: str, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """Right-padded sequences of lengths in [width/2, width], prompts of 20-50% of each."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=gen)
    prompts = (lengths * (0.2 + 0.3 * torch.rand(rows, generator=gen))).long()
    ids = torch.randint(3, vocab, (rows, width), generator=gen)
    pos = torch.arange(width)
    pad = pos[None, :] >= lengths[:, None]
    ids[pad] = 0
    labels = ids.masked_fill(pad | (pos[None, :] < prompts[:, None]), -100)
    return {"input_ids": ids.to(device), "attention_mask": (~pad).long().to(device),
            "labels": labels.to(device)}


def label_path(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch_logps(model, batch)[0]


def full_path(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sequence_logps(out.logits, batch["labels"])[0]


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor], score: Score,
        amp: Callable[[], AbstractContextManager[object]], device: str, reps: int
        ) -> dict[str, object]:
    """Time and peak memory of fwd + bwd; the log-probs and gradients of the last repetition."""
    weights = torch.linspace(-1.0, 2.0, batch["labels"].shape[0], device=device)
    seconds, peak = [], 0.0
    for rep in range(reps + 1):
        model.zero_grad(set_to_none=False)
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with amp():
            lp = score(model, batch)
        (lp * weights).sum().backward()
        sync(device)
        if rep:  # the first is the warm-up
            seconds.append(time.perf_counter() - t0)
        if device == "cuda":
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    return {"logps": lp.detach(), "grads": grads, "seconds": statistics.median(seconds),
            "peak_mb": peak}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast on a GPU, fp32 on CPU")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=128, help="sequences (64 pairs)")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--reps", type=int, default=5)
    opt = ap.parse_args()
    device = opt.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = opt.precision == "bf16" or (opt.precision == "auto" and device == "cuda")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=opt.vocab, hidden_size=opt.hidden,
                      intermediate_size=int(opt.hidden * 2.75) // 64 * 64,
                      num_hidden_layers=opt.layers, num_attention_heads=max(1, opt.hidden // 64),
                      num_key_value_heads=max(1, opt.hidden // 64), tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(device)
    assert lm_head_of(model) is not None, "the label path must be the one taken"

    def amp() -> AbstractContextManager[object]:
        return torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()

    batch = make_batch(opt.rows, opt.width, opt.vocab, device)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    results = {name: run(model, batch, fn, amp, device, opt.reps)
               for name, fn in (("label", label_path), ("full", full_path))}
    a, b = results["label"], results["full"]
    diff = (a["logps"] - b["logps"]).abs()
    d_lp = float(diff.max())
    d_g = max(float((a["grads"][k] - g).abs().max() / g.abs().max().clamp(min=1e-30))
              for k, g in b["grads"].items())
    (atol, rtol), tol_g = ((2e-2, 1e-4), 2e-2) if bf16 else ((1e-4, 1e-6), 1e-4)
    lp_ok = bool((diff <= atol + rtol * b["logps"].abs()).all())
    params = sum(p.numel() for p in model.parameters())
    print(f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, {'bf16 autocast' if bf16 else 'fp32'}, {params / 1e6:.0f}M "
          f"params, {opt.rows} sequences x {opt.width} (padded), {scored} label positions "
          f"({scored / batch['attention_mask'].sum().item():.0%} of the non-pad tokens), "
          f"vocab {opt.vocab}")
    for name, r in results.items():
        mem = f"{r['peak_mb']:9.0f} MB" if device == "cuda" else "(GPU only)"
        print(f"  {name:<5}  fwd+bwd {r['seconds'] * 1e3:8.1f} ms   peak above weights+grads "
              f"{mem}")
    ratio = f", peak {a['peak_mb'] / b['peak_mb']:.2f}x" if device == "cuda" else ""
    print(f"  label/full: time {a['seconds'] / b['seconds']:.2f}x{ratio}")
    ok = lp_ok and d_g <= tol_g
    print(f"  max |Δ log-prob sum| {d_lp:.2e} (sums up to {float(b['logps'].abs().max()):.0f}; "
          f"tolerance {atol:.0e} + {rtol:.0e}·|sum|); max |Δ grad| / max |grad| {d_g:.2e} "
          f"(tolerance {tol_g:.0e}): {'OK' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
