"""Log-probs at label positions (`lm_head.LabelLogps`) and in every forward layout
(`layouts.collate`, `layouts.pack`, shared prompts) against the full logits, on one device: the
same sums and gradients, and what each costs in time and peak memory.

A randomly initialised Llama (tied head, fp32 master weights) scores `--rows` sequences, two
responses to each of `--rows / 2` prompts (as a batch of pairs), under the run's precision
(bf16 autocast on a GPU, fp32 on CPU), four ways: one padded forward to the (B, T, V) logits
scored by `sequence_logps` (the pure reference, "full"); `batch_logps` on the padded batch
(hidden states at label positions, chunked LM head, "label"); on packed rows ("packed"); on
packed rows with each prompt once ("shared"). Each is timed over forward + backward of a
per-sequence weighted sum (as the DPO loss weighs its sequences), after a warm-up, with a
device synchronize around each repetition; GPU peak memory is `torch.cuda.max_memory_allocated`
above what the model and its gradients hold.

    python bench/label_logps_check.py                       # GPU if there is one: 340m shape
    python bench/label_logps_check.py --device cpu --hidden 256 --layers 2 --vocab 8192

Exits 1 when a path disagrees with the full logits beyond the tolerance of the precision,
|Δ| ≤ atol + rtol·|sum| on each sequence's log-prob sum (fp32: 1e-4 + 1e-6·|sum|, GEMMs blocked
by another row count round otherwise; bf16: 2e-2 + 1e-4·|sum|, a logit rounded to the other
side of a bf16 step moves a sum by up to one step) and max |Δ grad| over each parameter's
largest gradient (fp32 1e-4, bf16 2e-2).
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

from pipeline.encoding import Encoded
from pipeline.layouts import collate, pack
from pipeline.lm_head import lm_head_of
from pipeline.logps import attention_cost, batch_logps, sequence_logps

Score = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def make_sequences(rows: int, width: int, vocab: int, seed: int = 0) -> list[Encoded]:
    """`rows` sequences of lengths in [width/2, width]: two responses to each of `rows / 2`
    prompts of 20-50% of the longer one."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows // 2):
        lengths = torch.randint(width // 2, width + 1, (2,), generator=gen).tolist()
        k = int(max(lengths) * (0.2 + 0.3 * float(torch.rand(1, generator=gen))))
        prompt = torch.randint(3, vocab, (k,), generator=gen).tolist()
        for n in lengths:
            response = torch.randint(3, vocab, (n - k,), generator=gen).tolist()
            out.append(Encoded.join(prompt, response))
    return out


def full_path(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sequence_logps(out.logits, batch["labels"])[0]


def layout_path(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch_logps(model, batch)[0]


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor], score: Score,
        amp: Callable[[], AbstractContextManager[object]], device: str, reps: int,
        n_sequences: int) -> dict[str, object]:
    """Time and peak memory of fwd + bwd; the log-probs and gradients of the last repetition."""
    weights = torch.linspace(-1.0, 2.0, n_sequences, device=device)
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

    seqs = make_sequences(opt.rows, opt.width, opt.vocab)
    padded = collate(seqs, 0)
    cost = attention_cost(model)
    batches = {"full": padded, "label": padded, "packed": pack(seqs, 0, False, cost),
               "shared": pack(seqs, 0, True, cost)}
    batches = {k: {n: t.to(device) for n, t in b.items()} for k, b in batches.items()}
    scored = sum(e.n_response_tokens for e in seqs)
    tokens = sum(len(e.input_ids) for e in seqs)
    results = {name: run(model, batch, full_path if name == "full" else layout_path, amp,
                         device, opt.reps, len(seqs))
               for name, batch in batches.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, {'bf16 autocast' if bf16 else 'fp32'}, {params / 1e6:.0f}M "
          f"params, {opt.rows} sequences ({opt.rows // 2} prompts x 2) up to {opt.width} tokens, "
          f"{tokens} tokens, {scored} label positions, vocab {opt.vocab}")
    ref = results["full"]
    (atol, rtol), tol_g = ((2e-2, 1e-4), 2e-2) if bf16 else ((1e-4, 1e-6), 1e-4)
    ok = True
    for name, r in results.items():
        shape = tuple(batches[name]["input_ids"].shape)
        mem = f"{r['peak_mb']:8.0f} MB" if device == "cuda" else "(GPU only)"
        line = (f"  {name:<6} {shape!s:<12} fwd+bwd {r['seconds'] * 1e3:8.1f} ms "
                f"({r['seconds'] / ref['seconds']:.2f}x full), peak above weights+grads {mem}")
        if name != "full":
            diff = (r["logps"] - ref["logps"]).abs()
            d_g = max(float((r["grads"][k] - g).abs().max() / g.abs().max().clamp(min=1e-30))
                      for k, g in ref["grads"].items())
            good = bool((diff <= atol + rtol * ref["logps"].abs()).all()) and d_g <= tol_g
            ok = ok and good
            line += (f"; max |Δ sum| {float(diff.max()):.1e}, max |Δ grad|/max |grad| "
                     f"{d_g:.1e}: {'OK' if good else 'FAILED'}")
        print(line)
    print(f"  tolerance: |Δ sum| <= {atol:.0e} + {rtol:.0e}·|sum| (sums up to "
          f"{float(ref['logps'].abs().max()):.0f}), |Δ grad| / max |grad| <= {tol_g:.0e}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
