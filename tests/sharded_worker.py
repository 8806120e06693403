"""Run by tests/test_sharding.py under torchrun (2 gloo processes on CPU); writes what each
rank measured to `<out>/rank-<r>.json`.

1. Sharded loading (`sharding.load_sharded`) of a model the test saved: peak host memory
   (ru_maxrss) before and after, per rank.
2. The label-position log-probs of the sharded model, and their gradients (gathered), against
   one unsharded padded forward through the full logits (`tiny_lms`).
3. Sharded SFT (`run_sft` with `sharding: fsdp2`, one epoch) on the test project's pairs,
   saved to `<out>/sft`, for the test to hold against one process with 2 accumulation steps.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import replace
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(model_dir: Path, project: Path, out: Path) -> None:
    import pandas as pd
    import torch
    from test_training import SFT_CFG, TINY
    from tiny_lms import full_logits, logps_and_grads, padded_batch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from pipeline import paths, sharding
    from pipeline.config import ModelConfig
    from pipeline.lm_head import lm_head_of
    from pipeline.logps import batch_logps
    from pipeline.sft import run_sft
    from pipeline.training import make_accelerator

    accelerator = make_accelerator(SFT_CFG)
    rank = accelerator.process_index
    before = peak_rss_mb()
    model, _ = sharding.load_sharded(model_dir, accelerator.device)
    after = peak_rss_mb()
    report: dict[str, object] = {"rank": rank, "rss_before_mb": before, "rss_peak_mb": after,
                                 "sharded": sharding.is_sharded(model),
                                 "label_head": lm_head_of(model) is not None}

    batch = padded_batch()
    widths: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: widths.append(o.shape[1]))
    got, grads = logps_and_grads(model, lambda m: batch_logps(m, batch))
    handle.remove()
    grads = {k: g.full_tensor() if isinstance(g, DTensor) else g for k, g in grads.items()}
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    want, want_grads = logps_and_grads(reference, full_logits(batch))
    report.update(
        logits_widths=widths,
        logps_max_abs_diff=float((got - want).abs().max()),
        grad_names_equal=sorted(grads) == sorted(want_grads),
        grad_max_rel_diff=max(float((grads[k] - g).abs().max() / g.abs().max().clamp(min=1e-12))
                              for k, g in want_grads.items()))
    del model, reference

    train = pd.read_parquet(project / paths.PAIRS_TRAIN)
    test = pd.read_parquet(project / paths.PAIRS_TEST)
    sft = run_sft(ModelConfig(tiny=TINY), replace(SFT_CFG, epochs=1, sharding="fsdp2"), train,
                  test, out / "sft")
    report["sft"] = {k: sft[k] for k in ("steps", "train_loss", "heldout_loss_before",
                                         "heldout_loss_after", "parameters")}
    (out / f"rank-{rank}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
