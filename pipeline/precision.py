"""Where tensors live and in which precision: the one home of device choice, weight dtype and
autocast, so that training, reference scoring, generation and evaluation compute alike.

The rule (what makes a policy equal to its reference at step 0 give a DPO logit of exactly 0):
trainable weights are always fp32 (master weights, whatever dtype the checkpoint was saved
in); `mixed_precision` (`auto` = bf16 autocast on a GPU that supports it, none on CPU) decides
the autocast used by every forward pass that produces a log-prob, in training and in scoring.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from pipeline.config import MixedPrecision, WeightDtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device() -> torch.device:
    """The device of a single-process stage: the first GPU if there is one, else the CPU.
    Multi-process training gets its device from accelerate instead."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(mp: MixedPrecision, on: torch.device | None = None) -> str:
    """`auto` -> `bf16` on a GPU with bf16 support, `no` elsewhere; explicit values pass."""
    if mp != "auto":
        return mp
    on = on or device()
    cuda = on.type == "cuda" and torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"


def autocast(mp: MixedPrecision, on: torch.device | str) -> AbstractContextManager[object]:
    """The autocast context that training uses for `mp` on `on` (a no-op for fp32)."""
    on = torch.device(on)
    resolved = resolve_mixed_precision(mp, on)
    if resolved == "no":
        return nullcontext()
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(device_type=on.type, dtype=dtype)


def weight_dtype(name: WeightDtype) -> torch.dtype:
    """Dtype that inference stages load weights in. `auto` is fp32, the dtype the policy was
    trained in, so scoring under the same autocast reproduces training's numbers; bf16 halves
    the memory of a 7B model at the price of a small mismatch with training."""
    return torch.float32 if name == "auto" else _DTYPES[name]


def save_dtype(name: WeightDtype, loaded: torch.dtype) -> torch.dtype:
    """Dtype a trained model is saved in: `auto` is `loaded`, the dtype of the checkpoint
    training started from (a bf16 7B model's SFT and policy stay 14 GB, not 28: the fp32 master
    weights are cast back), else the one named."""
    return loaded if name == "auto" else _DTYPES[name]
