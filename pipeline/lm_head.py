"""The LM head at label positions only: log-probs from the hidden states a causal LM feeds its
output projection, `chunk` rows at a time (`LabelLogps`), for the models where that split is
exact (`lm_head_of`). No (B, T, V) logits are ever made; `logps.batch_logps` uses this and keeps
the full logits (`logps.sequence_logps`) for any model `lm_head_of` refuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.autograd.function import FunctionCtx
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel


@dataclass(frozen=True)
class ModelType:
    """What the scoring path relies on in a `model_type`, read in transformers 5.24.

    Every listed type's `*ForCausalLM.forward` returns exactly `lm_head(x)` of the head's input
    x (nothing touches the logits after the head), or, `scaled_head`, that times the constant
    it keeps in `logit_scale` (Cohere). `packable`: its attention honours packed
    `position_ids` (a new sequence wherever the position does not count on by one) and a ready
    4D mask (shared prompts)."""

    scaled_head: bool = False
    packable: bool = True


#: The one allow-list of model types the label-position head (`lm_head_of`) and the packed
#: layouts (`logps.packing_refusal`) run on; any other type keeps the full logits and the
#: padded layout. Each entry is tested: its label-position log-probs and gradients against the
#: full logits (tests/test_lm_head.py; Gemma 3 270M itself in tests/test_gemma.py), and, where
#: packable, its packed rows against the padded ones (tests/test_logps.py). Gemma 3 caps its
#: logits only where `final_logit_softcapping` is set (not in Gemma 3 270M); a set field of
#: `_POST_HEAD_FIELDS` keeps the full logits, as do Gemma 2's softcapping and Granite's
#: `logits_scaling` (not listed).
MODEL_TYPES: dict[str, ModelType] = {
    **{kind: ModelType() for kind in (
        "falcon", "gemma", "gemma3_text", "glm4", "gpt_neox", "gptj", "llama", "mistral",
        "mixtral", "olmo", "olmo2", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
        "smollm3", "stablelm", "starcoder2")},
    # Not packable: OPT takes its positions from the attention mask, GPT-2 warns of padding
    # without a mask; the others are not tested with packed rows.
    **{kind: ModelType(packable=False) for kind in ("deepseek_v3", "gpt2", "ministral", "opt")},
    "cohere": ModelType(scaled_head=True),
    "cohere2": ModelType(scaled_head=True, packable=False),
}
#: Config fields by which some models transform their logits after the head: a plain model
#: type that sets one (a later transformers, a hand-edited config) keeps the full logits.
_POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "lm_head_multiplier", "output_multiplier")


@dataclass(frozen=True)
class LMHead:
    """The output projection of a causal LM whose logits are exactly `scale · (x Wᵀ + b)`, x
    being what the model feeds its `lm_head` module; W may be tied to the input embedding."""

    module: torch.nn.Linear
    scale: float = 1.0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP's and peft's wrappers (LoRA injects its layers in
    place; its wrapper only forwards)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if callable(getattr(model, "get_base_model", None)):  # peft's PeftModel
        model = model.get_base_model()
    return model


def lm_head_of(model: torch.nn.Module) -> LMHead | None:
    """The LM head to compute log-probs from hidden states with, or None where the split is not
    sure to be exact and `batch_logps` keeps today's full logits (`sequence_logps`).

    `model` may be wrapped by DDP and by peft (LoRA injects its layers in place; its wrapper
    only forwards). Refused: models outside `MODEL_TYPES` or with remote code
    (the forward is unknown), a head that is not a plain `nn.Linear` (LoRA on `lm_head`, a
    quantized layer), and sharded or offloaded weights (FSDP1, DeepSpeed, a `device_map`),
    which are only whole inside the model's own forward. The exception: a head in the root
    group of an FSDP2 model (`pipeline.sharding.shard`), whose parameters the root gathers
    before its forward and keeps whole until its backward, so `hidden_logps` reads them whole
    after the forward, and their gradients reduce-scatter with the root's.
    """
    head = _head_or_refusal(model)
    return head if isinstance(head, LMHead) else None


def head_path(model: torch.nn.Module) -> str:
    """Which log-prob path `batch_logps` takes for `model`, and why, for the stage logs."""
    head = _head_or_refusal(model)
    if isinstance(head, LMHead):
        return "label positions only (LabelLogps)"
    return f"full logits ({head})"


def _head_or_refusal(model: torch.nn.Module) -> LMHead | str:
    model = unwrap(model)
    # FSDP2 subclasses the model's class (as FSDP<Name>); the class that runs is its base.
    cls = type(model).__mro__[2] if isinstance(model, FSDPModule) else type(model)
    if not isinstance(model, PreTrainedModel) \
            or not cls.__module__.startswith("transformers.models."):
        return "not a transformers model: its forward is unknown"
    kind = model.config.model_type
    known = MODEL_TYPES.get(kind)
    if known is None:
        return f"model type {kind!r} is not one whose head is known to be plain"
    if not known.scaled_head:
        post = [f for f in _POST_HEAD_FIELDS if getattr(model.config, f, None) is not None]
        if post:
            return f"the config transforms the logits after the head ({post[0]})"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or hasattr(head, "_hf_hook"):
        return "the head is not a plain Linear layer (LoRA, quantized or offloaded)"
    root_group = _in_root_group(model, head)
    for p in head.parameters():
        plain = type(p) is torch.nn.Parameter or (root_group and isinstance(p, DTensor))
        if not plain or p.device.type == "meta" or hasattr(p, "ds_id"):
            return "the head's weights are sharded outside the root group or offloaded"
    scale = float(model.logit_scale) if known.scaled_head else 1.0
    return LMHead(head, scale)


def _in_root_group(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    """Whether `head` belongs to the root group of an FSDP2 `model`: no module from the root
    down to the head (itself included) is sharded on its own. FSDP2 keeps the root's
    parameters unsharded from its forward through its backward."""
    if not isinstance(model, FSDPModule):
        return False
    for name, module in model.named_modules():
        if module is head:
            parts = name.split(".")
            return not any(isinstance(model.get_submodule(".".join(parts[:i])), FSDPModule)
                           for i in range(1, len(parts) + 1))
    return False


#: `torch.addmm(..., out_dtype=)` from half inputs, CUDA only.
_CUDA_MM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


def _fp32_addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into an fp32 `acc`. From half-precision inputs on CUDA, cuBLAS writes the
    product in fp32 (torch >= 2.8), as TRL's kernel does; elsewhere a half product is rounded
    once per chunk, as the full-logits path rounds the whole (bf16) gradient once."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _CUDA_MM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(a, b))


class LabelLogps(torch.autograd.Function):
    """log softmax(scale · (h Wᵀ + b))[label] at N positions, `chunk` rows at a time, in fp32.

    h (N, H) is in the dtype the head computes in (bf16 under autocast, as `lm_head` would
    cast it); W (V, H) and b (V,) are the master parameters, cast per call. Each chunk's
    logits are a GEMM in that dtype, rounded to it as the model's own logits are, then an fp32
    logsumexp. Backward recomputes each chunk's logits and softmax and turns them into
    dz = g·(onehot(label) − softmax); grad h = dz W, grad W += dzᵀ h (accumulated in fp32),
    grad b += Σ dz. Peak memory grows with chunk × V, not with B·T·V. The loop runs over
    Python ints, so nothing waits for the device.
    """

    #: Logits per chunk: 2^25 (1,024 rows at V = 32k) hold ~0.3 GB in fp32, their half copy
    #: and the logsumexp's temporary.
    CHUNK_LOGITS = 1 << 25

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, labels: torch.Tensor, scale: float, chunk: int
                ) -> torch.Tensor:
        dtype, on = hidden.dtype, hidden.device.type
        out = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        # Explicit dtypes: whatever autocast is active around the call must not recast them.
        with torch.autocast(on, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, labels.shape[0], chunk):
                rows = slice(start, start + chunk)
                z = _chunk_logits(hidden[rows], w, b, scale)
                lse[rows] = torch.logsumexp(z, -1)
                out[rows] = z.gather(1, labels[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                            None, None, None]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, on = hidden.dtype, hidden.device.type
        g = grad_out.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        with torch.autocast(on, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, labels.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h = hidden[rows]
                dz = _chunk_logits(h, w, b, ctx.scale).sub_(lse[rows, None]).exp_()
                dz.mul_(-g[rows, None]).scatter_add_(1, labels[rows, None], g[rows, None])
                if ctx.scale != 1.0:
                    dz.mul_(ctx.scale)
                if grad_b is not None:
                    grad_b.add_(dz.sum(0))
                dz = dz.to(dtype)
                if grad_h is not None:
                    torch.mm(dz, w, out=grad_h[rows])
                if grad_w is not None:
                    _fp32_addmm_(grad_w, dz.t(), h)
        return (grad_h,
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None, None)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: float
                  ) -> torch.Tensor:
    """fp32 logits (n, V) of a chunk, rounded first to the head's dtype as `lm_head` (and a
    Cohere model's scaling, in that dtype) would round them; a no-op copy in fp32."""
    z = torch.nn.functional.linear(h, w, b)
    if scale != 1.0:
        z = z * scale
    return z.float()


def chunk_rows(vocab: int) -> int:
    """Rows per `LabelLogps` chunk: about `LabelLogps.CHUNK_LOGITS` logits."""
    return max(1, LabelLogps.CHUNK_LOGITS // vocab)


def hidden_logps(hidden: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor,
                 head: LMHead, dtype: torch.dtype, chunk: int, into: torch.Tensor | None = None,
                 sequences: int | None = None) -> torch.Tensor:
    """Summed log-prob of the labels of each sequence from the head's input hidden (R, W, H),
    at flat positions `pos` (N,) with their `labels` (N,), computed in `dtype` (the head's
    autocast dtype, or its own). Each log-prob goes to flat position `into` (N,) (default
    `pos`) of a (sequences, W) grid (default R rows, one sequence per row), summed along W.
    """
    rows, width = hidden.shape[:2]
    h = hidden.reshape(rows * width, -1).index_select(0, pos).to(dtype)
    weight = head.module.weight
    if isinstance(weight, DTensor):  # FSDP2 resharded the root after its forward after all
        raise RuntimeError("the LM head's weight is sharded after the model's forward; "
                           "its log-probs need it whole (lm_head_of)")
    lp = LabelLogps.apply(h, weight, head.module.bias, labels, head.scale, chunk)
    # Into a zero grid and summed along W: the order of the full-logits path's sum,
    # deterministic (an index_add_ would sum with atomics on a GPU).
    n = rows if sequences is None else sequences
    grid = torch.zeros(n * width, dtype=lp.dtype, device=lp.device)
    grid = grid.index_copy(0, pos if into is None else into, lp)
    return grid.view(n, width).sum(-1)


@contextmanager
def head_input(head: LMHead) -> Iterator[list[tuple[torch.Tensor, torch.dtype]]]:
    """Catch what the model feeds its LM head, with the dtype the head would compute in, and
    feed the head an empty slice instead: the model's own logits come out (B, 0, V), so
    neither the (B, T, V) logits nor accelerate's fp32 copy of them are ever made."""
    seen: list[tuple[torch.Tensor, torch.dtype]] = []

    def grab(module: torch.nn.Module, args: tuple[torch.Tensor, ...]
             ) -> tuple[torch.Tensor, ...]:
        x = args[0]
        on = x.device.type
        dtype = torch.get_autocast_dtype(on) if torch.is_autocast_enabled(on) else x.dtype
        seen.append((x, dtype))
        return (x[..., :0, :], *args[1:])

    handle = head.module.register_forward_pre_hook(grab)
    try:
        yield seen
    finally:
        handle.remove()
