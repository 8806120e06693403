"""Sharded training (`sharding: fsdp2`): torch's FSDP2 applied by the project, under any launcher.

accelerate keeps the process group, autocast, `backward`, `reduce` and the loop's gradient
accumulation; this module shards the model itself, because accelerate applies its FSDP plugin
on GPUs only (on gloo CPU processes it reports MULTI_CPU and wraps in DDP), and the code a GPU
user runs must be the code CI runs on CPU processes.

- `shard`: `fully_shard` on every decoder layer (the classes the model names in
  `_no_split_modules`), then on the root, whose group holds the embedding, the final norm and
  the LM head (tied or not). Parameters stay fp32 (master weights) and gradients reduce in
  fp32; compute precision comes from the autocast every forward already runs under
  (`precision.autocast`), so a sharded policy computes like the unsharded reference that
  scored its pairs.
- `load_sharded`: rank 0 reads the checkpoint; the other ranks build the model on the meta
  device and receive their shards from rank 0, so a 7B model is in host memory once (on
  rank 0), not once per rank.
- `full_state_dict`: the full, gathered weights on rank 0 (CPU), which `save_pretrained`
  writes; `ShardedState`: the resumable state of a sharded run, each rank writing its own
  shards (torch.distributed.checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import Sharding
from pipeline.errors import UserError
from pipeline.modeling import load_pretrained


def active(sharding: Sharding, num_processes: int) -> bool:
    """Whether a run shards: `fsdp2` with more than one process (one process holds the whole
    model anyway; it trains unsharded, through the same loop)."""
    return sharding == "fsdp2" and num_processes > 1


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's outermost blocks of the classes it names in `_no_split_modules`
    (transformers' own list of blocks that must stay whole: a Llama's `LlamaDecoderLayer`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    if not found:
        raise UserError(f"sharding: fsdp2 needs the decoder layer classes of "
                        f"{type(model).__name__} (it names none in _no_split_modules); "
                        "set sharding: none")
    return [m for _, m in found]


def shard(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """`fully_shard` every decoder layer, then the root, over all processes (in place)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # fp32 parameters all-gathered, fp32 gradient reduction: the autocast of the loop makes
    # the bf16 compute on a GPU, as it does for the reference scores (a bf16 `param_dtype`
    # would also run the embedding, norms and the head's input in bf16: a policy at step 0
    # would no longer score as its reference).
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Register the sharded parameters again where a forward without backward (no_grad
    scoring) left the root's gathered ones: an optimizer built now, or a checkpoint taken
    now, must see the sharded parameters, which are the ones training updates."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def load_sharded(name: str | Path, device: torch.device, *, revision: str | None = None,
                 trust_remote_code: bool = False
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model at `name`, sharded over all processes, with fp32 weights read once.

    Every rank builds the model from its config with meta parameters (no memory; buffers such
    as rotary frequencies computed for real) and shards it; rank 0 alone reads the checkpoint
    and broadcasts one full tensor at a time, of which each rank keeps its shard, assigned in
    place of the meta one. Peak host memory: the full model and a shard on rank 0, a shard
    and the largest tensor in flight on the others (tests/test_sharding.py measures it)."""
    kw = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": torch.float32}
    model, tokenizer = load_pretrained(name, weights=False, **kw)
    full = load_pretrained(name, **kw)[0].state_dict() if dist.get_rank() == 0 else {}
    model = shard(model, device)
    tied = len(list(model.parameters()))
    set_model_state_dict(model, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    del full
    # Assigning the shards gave each name of a tied parameter an object of its own (the
    # optimizer would hold a copy nothing trains); tie them again, as the model was built.
    model.tie_weights()
    if len(list(model.parameters())) != tied:
        raise RuntimeError(f"{type(model).__name__}: tied parameters came apart in loading")
    return model, tokenizer


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights, gathered shard by shard onto rank 0's CPU (empty on the other ranks);
    every rank must call it. A tied parameter is written once, under its first name, as
    `save_pretrained` writes an unsharded model (the gathered copies share no storage)."""
    reshard(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            full.pop(name, None)
        seen.add(id(p))
    return full


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the sharded gradients to a global L2 norm of `max_norm`; the norm before clipping,
    reduced over all shards."""
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class ShardedState:
    """The resumable state of a sharded run in a folder: model and optimizer shards written by
    every rank in parallel (torch.distributed.checkpoint, `dcp/`), the scheduler's state
    (`scheduler.json`) and each rank's RNG (`rng-<rank>.safetensors`). Only the process count
    of the run that wrote it reads its RNG files; DCP itself reshards to another count."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

    def _state(self) -> dict[str, dict]:
        reshard(self.model)
        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        # Every rank: each may be first to write (a shared folder on several nodes).
        (folder / "dcp").mkdir(parents=True, exist_ok=True)
        dcp.save(self._state(), checkpoint_id=str(folder / "dcp"))
        save_file(_rng_state(), str(folder / f"rng-{dist.get_rank()}.safetensors"))
        if dist.get_rank() == 0:
            (folder / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
        rng = folder / f"rng-{dist.get_rank()}.safetensors"
        if rng.exists():
            _set_rng_state(load_file(str(rng)))


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
