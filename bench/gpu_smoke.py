"""The users' path on whatever device this machine has (a GPU: bf16 autocast, fp32 master
weights), stage by stage without DVC (GPU machines may lack it): a Llama checkpoint saved in
bf16 with a chat template and a SentencePiece-style tokenizer, on long PKU-SafeRLHF-v1-shaped
rows, through source → download → normalize → sft → ref_logps → train → generate → judge →
evaluate, plus the step-0 check that a policy equal to its reference has DPO logits of 0 under
the training precision.

    python bench/gpu_smoke.py [--rows 96] [--hidden 256] [--layers 4] [--work DIR]

Prints each stage's log line, its wall-clock, the step-0 implicit rewards and the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None)
    opt = ap.parse_args()

    from real_models import corpus, metaspace_tokenizer, pku_v1_rows, save_hub_like, tiny_llama

    from pipeline import paths
    from pipeline.artifacts import read_parquet
    from pipeline.config import load_params
    from pipeline.encoding import Encoder, load_template
    from pipeline.logps import forward_layout
    from pipeline.modeling import load_pretrained
    from pipeline.objectives import OBJECTIVES, select_pairs
    from pipeline.preference import (
        PreferenceDirs,
        PreferenceLoss,
        preference_batch,
        preference_examples,
        run_preference,
    )
    from pipeline.reference import attach_reference, fingerprint_for, read_reference
    from pipeline.training import make_accelerator

    work = opt.work or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    rows = pku_v1_rows(opt.rows, seed=7)
    Path("inputs").mkdir(exist_ok=True)
    with open("inputs/pku_v1.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tok = metaspace_tokenizer(corpus(rows), vocab_size=2000)
    save_hub_like(tiny_llama(tok, seed=0, hidden=opt.hidden, layers=opt.layers), tok,
                  Path("inputs/llama-bf16"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"].update(name="inputs/pku_v1.jsonl", test_fraction=0.25)
    params["model"].update(name="inputs/llama-bf16", template="auto")
    params["sft"].update(epochs=1, batch_size=16, max_length=opt.max_length, lr=1e-3)
    params["train"].update(epochs=1, batch_size=16, max_length=opt.max_length, lr=1e-5,
                           checkpoint_every=1000)
    params["generate"].update(n_prompts=24, max_new_tokens=64, batch_size=24)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pf = Path("params.yaml")
    print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"torch {torch.__version__}, work dir {work}")

    def stage(name: str, run) -> None:
        t0 = time.perf_counter()
        run()
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)

    import importlib

    for name in ("source", "download", "normalize", "sft", "ref_logps"):
        stage(name, lambda n=name: importlib.import_module(f"stages.{n}").run(pf))

    # Step 0: the policy is the reference; under the training autocast its implicit rewards
    # must be 0, computed the way training computes them against the stored reference.
    p = load_params(pf)
    acc = make_accelerator(p.train)
    model, tokenizer = load_pretrained(paths.SFT_DIR, dtype=torch.float32)
    model.to(acc.device)
    enc = Encoder(tokenizer, load_template(paths.SFT_DIR), p.train.max_length)
    train = read_parquet(paths.PAIRS_TRAIN)
    ref = read_reference(paths.REF_TRAIN, fingerprint_for(paths.SFT_DIR, enc,
                                                          p.train.mixed_precision, train,
                                                          acc.device))
    selected, _ = select_pairs(train, "safedpo")
    examples = preference_examples(attach_reference(selected, ref), enc)[:32]
    layout = forward_layout(p.train.layout, p.train.forward_groups, model, acc.device)
    batch = {k: v.to(acc.device) for k, v in
             preference_batch(examples, tokenizer.pad_token_id, layout).items()}
    loss = PreferenceLoss(OBJECTIVES["safedpo"], p.beta, p.delta, layout)
    with torch.no_grad(), acc.autocast():
        _, m = loss(model, batch)
    print(f"step 0 under {acc.mixed_precision}: master weights "
          f"{next(model.parameters()).dtype}, rewards/chosen {float(m['rewards/chosen']):.2e}, "
          f"rewards/margins {float(m['rewards/margins']):.2e}")
    del model

    def train_stage() -> None:
        dirs = PreferenceDirs(paths.SFT_DIR, paths.REF_TRAIN, paths.POLICY_DIR,
                              checkpoints=paths.CHECKPOINT_DIR)
        s = run_preference(p.train, train, dirs, beta=p.beta, delta=p.delta)
        print(f"train: {s['steps']} steps, {s['pairs_trained']} pairs, final {s['final']}")

    stage("train", train_stage)
    for tag in ("sft", "policy"):
        stage(f"generate@{tag}", lambda t=tag: importlib.import_module("stages.generate")
              .run(pf, t))
    for name in ("judge", "evaluate"):
        stage(name, lambda n=name: importlib.import_module(f"stages.{n}").run(pf))
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    keys = ("harmless_rate", "helpfulness", "kl_to_ref", "length_stop_rate",
            "pref_accuracy_helpful", "low_support")
    print("metrics:", {k: metrics.get(k) for k in keys})


if __name__ == "__main__":
    main()
