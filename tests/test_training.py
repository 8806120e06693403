"""End-to-end preference training on a tiny model: learning, resume, multi-process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import paths
from pipeline.artifacts import write_parquet
from pipeline.config import ModelConfig, SFTConfig, TinyModelConfig, ToyConfig, TrainConfig
from pipeline.encoding import Encoder, load_template
from pipeline.logps import pair_logps
from pipeline.modeling import load_pretrained
from pipeline.normalize import normalize_splits
from pipeline.preference import PreferenceDirs, run_preference
from pipeline.reference import fingerprint_for, write_reference
from pipeline.sft import run_sft
from pipeline.toydata import generate

MAX_LEN = 128
TINY = TinyModelConfig(vocab_size=512, hidden_size=48, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, seed=0)
SFT_CFG = SFTConfig(lr=3e-3, epochs=3, batch_size=16, max_length=MAX_LEN)


def train_cfg(**kw: object) -> TrainConfig:
    base = dict(lr=2e-3, epochs=2, batch_size=16, max_length=MAX_LEN, warmup_ratio=0.1,
                checkpoint_every=4, log_every=1, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder laid out like the repository after `sft` and `ref_logps`."""
    root = tmp_path_factory.mktemp("project")
    train_raw, test_raw = generate(ToyConfig(n_train=192, n_test=48, seed=1))
    train, test, _ = normalize_splits(train_raw, test_raw)
    write_parquet(train, root / paths.PAIRS_TRAIN)
    write_parquet(test, root / paths.PAIRS_TEST)
    run_sft(ModelConfig(tiny=TINY), SFT_CFG, train, test, root / paths.SFT_DIR)
    model, tok = load_pretrained(root / paths.SFT_DIR)
    enc = Encoder(tok, load_template(root / paths.SFT_DIR), MAX_LEN)
    ref = pair_logps(model, enc, train, batch_size=64)
    write_reference(ref, fingerprint_for(root / paths.SFT_DIR, enc, "auto", train, "cpu"),
                    root / paths.REF_TRAIN)
    return root


def _train(project: Path, out: str, cfg: TrainConfig, live: bool = True,
           stop_after: int | None = None) -> dict:
    dirs = PreferenceDirs(project / paths.SFT_DIR, project / paths.REF_TRAIN, project / out,
                          project / f"{out}-live" if live else None, project / f"{out}-ckpt")
    return run_preference(cfg, pd.read_parquet(project / paths.PAIRS_TRAIN), dirs, beta=0.1,
                          delta=10.0, stop_after=stop_after)


def test_training_lowers_the_loss_and_raises_reward_accuracy(project: Path) -> None:
    summary = _train(project, "policy-learn", train_cfg())
    # T(D) on the toy data: every kind of pair is present, and the counts add up.
    assert summary["pairs_kept"] + summary["pairs_swapped"] + summary["pairs_dropped"] \
        == summary["pairs_in"] == 192
    assert summary["pairs_swapped"] > 0 and summary["pairs_dropped"] > 0
    plots = project / "policy-learn-live" / "plots" / "metrics"
    loss = pd.read_csv(plots / "loss.tsv", sep="\t")["loss"]
    acc = pd.read_csv(plots / "rewards" / "accuracies.tsv", sep="\t")["accuracies"]
    assert len(loss) == summary["steps"] == 2 * (summary["pairs_trained"] // 16)
    # At step 1 the policy is the reference, so the implicit rewards computed in training from
    # the stored reference log-probs must be 0 up to float noise of padding/batching.
    first = pd.read_csv(plots / "rewards" / "chosen.tsv", sep="\t")["chosen"].iloc[0]
    margin = pd.read_csv(plots / "rewards" / "margins.tsv", sep="\t")["margins"].iloc[0]
    assert abs(first) < 1e-5 and abs(margin) < 1e-5
    assert acc.head(2).mean() < 0.5
    assert loss.tail(4).mean() < 0.7 * loss.head(4).mean()
    assert acc.tail(4).mean() > 0.6 > acc.head(2).mean() + 0.3
    # The trained policy is a loadable HF directory with safetensors weights.
    assert (project / "policy-learn" / "model.safetensors").exists()


def test_resume_after_a_kill_gives_identical_weights(project: Path) -> None:
    cfg = train_cfg(epochs=1)  # 11 steps (180 pairs // 16), checkpoints at 4 and 8
    _train(project, "policy-straight", cfg)
    # "Killed" after step 6: the last checkpoint is step 4, steps 5-6 are lost work.
    _train(project, "policy-resumed", cfg, stop_after=6)
    assert not (project / "policy-resumed").exists()
    summary = _train(project, "policy-resumed", cfg)
    assert summary["resumed_from_step"] == 4
    a = load_file(project / "policy-straight" / "model.safetensors")
    b = load_file(project / "policy-resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit on CPU
    # The log has each step once, and the checkpoints are gone after a finished run.
    loss = pd.read_csv(project / "policy-resumed-live/plots/metrics/loss.tsv", sep="\t")
    assert loss["step"].tolist() == list(range(summary["steps"])) == list(range(11))
    assert not (project / "policy-resumed-ckpt").exists()


def test_packed_layouts_follow_the_padded_loss_trajectory(project: Path) -> None:
    """`train.layout` packed, shared_prompts and auto (the CPU default) train the same model
    as the padded layout: the same last-step metrics and final weights, up to the float
    rounding of other shapes."""
    kinds = ("padded", "packed", "shared_prompts", "auto")
    runs = {kind: _train(project, f"policy-{kind}", train_cfg(epochs=1, layout=kind), live=False)
            for kind in kinds}
    assert [r["layout"].split("; ")[0] for r in runs.values()][:3] == [
        "padded, 4 group(s)", "packed", "shared_prompts"]
    assert all(r["layout"].endswith("; log-probs from label positions only (LabelLogps)")
               for r in runs.values())
    # `auto` picks the cheapest layout batch by batch (tests/test_layouts.py shows it sharing
    # prompts where that is cheapest). Toy pairs of ~100 of 128 tokens sit near the tipping
    # point (1 of 11 batches shared on the toy data before its openings varied, none after), so
    # which layouts it picks here depends on the data's lengths: each batch is in one of them.
    assert runs["auto"]["layout"].startswith(
        "auto (per batch: padded, 4 group(s), packed or shared prompts): ")
    census = runs["auto"]["layout"].split("): ", 1)[1].split("; ")[0]
    counts = {kind: int(n) for n, kind in (c.split(" ", 1) for c in census.split(", "))}
    assert set(counts) <= {"padded", "packed", "shared_prompts"}, census
    assert sum(counts.values()) == runs["padded"]["steps"], census
    a = load_file(project / "policy-padded" / "model.safetensors")
    for kind in kinds[1:]:
        for k in ("loss", "rewards/margins", "grad_norm"):
            assert runs[kind]["final"][k] == pytest.approx(runs["padded"]["final"][k], rel=1e-4,
                                                           abs=1e-5), (kind, k)
        b = load_file(project / f"policy-{kind}" / "model.safetensors")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=f"{kind} {k}")


def test_a_changed_config_does_not_resume_an_old_checkpoint(project: Path) -> None:
    _train(project, "policy-other", train_cfg(epochs=1), stop_after=5)
    summary = _train(project, "policy-other", train_cfg(epochs=1, lr=1e-3))
    assert summary["resumed_from_step"] == 0


def _stage_env() -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "true", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_trajectory(project: Path,
                                                              tmp_path: Path) -> None:
    """DDP over gloo with the same global batch (16 = 2 processes × 8) must give the same
    per-step loss as one process: each step's loss is the mean over the same 16 pairs, and DDP
    averages the gradients of the two halves. Only float32 summation order differs, so the
    tolerance is 1e-5 relative."""
    work = tmp_path / "p"
    shutil.copytree(project / "data", work / "data")
    params = {"train": {"lr": 2e-3, "epochs": 1, "batch_size": 16, "max_length": MAX_LEN,
                        "checkpoint_every": 1000}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    safedpo = str(Path(sys.executable).parent / "safedpo")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    one = subprocess.run([safedpo, "train"], cwd=work, env=_stage_env(), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    single = pd.read_csv(work / "dvclive/plots/metrics/loss.tsv", sep="\t")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--no-python", safedpo, "train"],
                         cwd=work, env=_stage_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    double = pd.read_csv(work / "dvclive/plots/metrics/loss.tsv", sep="\t")
    assert double["step"].tolist() == single["step"].tolist() == list(range(11))
    torch.testing.assert_close(torch.tensor(double["loss"].to_numpy()),
                               torch.tensor(single["loss"].to_numpy()), rtol=1e-5, atol=1e-6)
    # Only the main process reports.
    assert two.stdout.count("train: safedpo") == 1


def test_lora_with_gradient_checkpointing_trains_and_merges(project: Path) -> None:
    from pipeline.config import LoraConfig

    cfg = train_cfg(epochs=1, gradient_checkpointing=True, checkpoint_every=1000,
                    lora=LoraConfig(enabled=True, r=4, alpha=8,
                                    target_modules=("q_proj", "v_proj")))
    summary = _train(project, "policy-lora", cfg, live=False)
    assert summary["steps"] == 11
    sft = load_file(project / paths.SFT_DIR / "model.safetensors")
    merged = load_file(project / "policy-lora" / "model.safetensors")
    # Merged on save: a plain model, whose LoRA targets moved and nothing else did.
    assert merged.keys() == sft.keys()
    for k in sft:
        moved = not torch.equal(sft[k], merged[k])
        assert moved == (".q_proj." in k or ".v_proj." in k), k


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed precision per process; a test that wants another resets it,
    and resets it again for the tests after it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_prepared_bf16_model_scores_label_positions_only(project: Path,
                                                         fresh_accelerate_state: None) -> None:
    """Under accelerate's bf16 (autocast inside the model's forward, outputs cast to fp32), the
    training step's log-probs come from the head's input at label positions, in bf16 as the
    head would compute them: the model's own logits come out empty, so neither the (B, T, V)
    logits nor accelerate's fp32 copy of them exist, and the log-probs are those of the full
    bf16 logits."""
    from pipeline.lm_head import lm_head_of
    from pipeline.logps import ForwardLayout, batch_logps, sequence_logps
    from pipeline.objectives import select_pairs
    from pipeline.preference import preference_batch, preference_examples
    from pipeline.training import make_accelerator

    model, tok = load_pretrained(project / paths.SFT_DIR)
    accelerator = make_accelerator(train_cfg(mixed_precision="bf16"))
    assert accelerator.mixed_precision == "bf16"
    model = accelerator.prepare(model)
    assert lm_head_of(model) is not None
    enc = Encoder(tok, load_template(project / paths.SFT_DIR), MAX_LEN)
    selected, _ = select_pairs(pd.read_parquet(project / paths.PAIRS_TRAIN), "safedpo")
    items = preference_examples(selected.head(8).assign(ref_chosen=0.0, ref_rejected=0.0), enc)
    batch = preference_batch(items, tok.pad_token_id, ForwardLayout(groups=2))
    logits_shapes: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_hook(
        lambda m, args, out: logits_shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            got, n = batch_logps(model, batch, groups=2)
    finally:
        handle.remove()
    assert [s[1] for s in logits_shapes] == [0, 0]
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert full.logits.dtype == torch.float32  # accelerate's copy of the bf16 logits
        want, want_n = sequence_logps(full.logits, batch["labels"])
        fp32, _ = batch_logps(accelerator.unwrap_model(model, keep_fp32_wrapper=False), batch)
    assert torch.equal(n, want_n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert (got - fp32).abs().max() > 1e-3  # bf16 is what ran
