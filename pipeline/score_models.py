"""Hub score models behind the `Judge` interface: the paper's protocol (PKU-Alignment
beaver-7b-v1.0 reward and cost) and any `AutoModelForSequenceClassification` with one label.

Two layouts load without `trust_remote_code`: `sequence_classification`, and the safe-rlhf
score-model layout (`*ForScore`: a backbone under `model.` plus a linear `score_head`, read at
the last non-pad token). Only safetensors weights are read.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.artifacts import refuse_broken_link
from pipeline.config import JudgeConfig
from pipeline.encoding import NAMED_TEMPLATES, render_chat
from pipeline.errors import UserError
from pipeline.precision import device as default_device

if TYPE_CHECKING:
    from transformers import BatchEncoding

LAYOUTS = ("sequence_classification", "beaver_score")
# The pipeline's prompt templates with the response appended as each score model reads it.
BEAVER_TEMPLATE = NAMED_TEMPLATES["safe_rlhf"] + "{response}"
PLAIN_TEMPLATE = NAMED_TEMPLATES["plain"] + " {response}"


def resolve_model(source: str, revision: str | None = None, *,
                  local_files_only: bool = False) -> tuple[Path, str | None]:
    """A local model directory for `source` (a local dir or a hub id) and its hub commit, if any."""
    path = Path(source).expanduser()
    refuse_broken_link(path, "the judge model")
    if path.is_dir():
        return path, None
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1 or path.exists()
    if looks_local:
        raise UserError("model directory not found (give an existing local directory or a hub "
                        "id like PKU-Alignment/beaver-7b-v1.0-cost)", path=source)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    try:
        local = Path(snapshot_download(source, revision=revision, allow_patterns=patterns,
                                       local_files_only=local_files_only))
    except Exception as exc:  # any hub failure (network, auth, missing repo) is the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot fetch hub model {source!r} ({type(exc).__name__}: {reason}); "
                        "download it to a local directory and point judge.reward_model, "
                        "judge.cost_model or judge.guard.model at it, or use judge.kind: "
                        "offline") from None
    return local, local.name if re.fullmatch(r"[0-9a-f]{40}", local.name) else None


def read_model_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError("no config.json: not a Hugging Face model directory", path=model_dir)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"invalid config.json ({exc})", path=model_dir) from None
    if not isinstance(cfg, dict):
        raise UserError("config.json is not a JSON object", path=model_dir)
    return cfg


def detect_layout(model_dir: Path, layout: str = "auto") -> str:
    """`sequence_classification` or `beaver_score`, from config.json's `architectures`."""
    cfg = read_model_config(model_dir)
    if layout != "auto":
        if layout not in LAYOUTS:
            raise UserError(f"unknown score-model layout {layout!r}; expected auto or {LAYOUTS}")
        return layout
    archs = cfg.get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        return "sequence_classification"
    if any(str(a).endswith("ForScore") for a in archs):
        return "beaver_score"
    raise UserError(f"unknown score-model layout (architectures {archs}); expected "
                    "*ForSequenceClassification or a safe-rlhf *ForScore model, or set "
                    "judge.layout", path=model_dir)


def model_fingerprint(model_dir: Path) -> str:
    """Hash of config.json and the weight files' names and sizes: cheap, and enough to notice a
    local model directory that changed after its accuracy was measured."""
    h = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [model_dir / s for s in shards]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        raise UserError("no (or incomplete) safetensors weights; pickled .bin checkpoints are "
                        "refused because loading them can run code", path=model_dir)
    return files


def scoring_placement(device: str | None) -> tuple[torch.device, torch.dtype]:
    """Where a judge's model scores (`device`, else the default device) and the dtype it loads
    in: bf16 on a GPU (a 7B judge in 14 GB), fp32 elsewhere."""
    on = torch.device(device) if device else default_device()
    return on, torch.bfloat16 if on.type == "cuda" else torch.float32


def load_judge_model(auto_class: Any, model_dir: Path, on: torch.device, dtype: torch.dtype,
                     failure: str, **kwargs: Any) -> Any:
    """A judge's model (a score model, a guard) ready to score: from `model_dir`'s local
    safetensors only (a pickled checkpoint can run code), in `dtype`, on `on` (on a GPU loaded
    straight onto it: a 7B model need not pass through host memory), in eval mode. `failure`
    begins the one-line error of a model that does not load. The pipeline's own models load
    through `modeling.load_for_scoring`."""
    try:
        placement = {"device_map": {"": on}} if on.type == "cuda" else {}
        model = auto_class.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                           use_safetensors=True, **placement, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{failure} ({failure_reason(exc)})", path=model_dir) from None
    return model.to(on).eval()


def load_judge_tokenizer(model_dir: Path, what: str, **kwargs: Any) -> Any:
    """The tokenizer of a judge's model directory (local files only); `what` names it in the
    one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load {what} ({failure_reason(exc)})", path=model_dir) from None


def failure_reason(exc: Exception) -> str:
    """The first line of a library's exception, for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class ScoreModel:
    """One hub score model: tokenises with the layout's template, scores at the last token."""

    def __init__(self, model_dir: Path, layout: str, *, batch_size: int = 16,
                 max_length: int = 1024, device: str | None = None) -> None:
        self.model_dir, self.layout = Path(model_dir), layout
        self.batch_size, self.max_length = batch_size, max_length
        self.device, self.dtype = scoring_placement(device)
        self.tokenizer = load_judge_tokenizer(self.model_dir, "the tokenizer")
        self.tokenizer.padding_side = "right"  # positions then match the unpadded sequence
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if layout == "beaver_score":
            self._load_beaver()
        else:
            self._load_sequence_classification()

    def _load_sequence_classification(self) -> None:
        from transformers import AutoModelForSequenceClassification

        model = load_judge_model(AutoModelForSequenceClassification, self.model_dir,
                                 self.device, self.dtype,
                                 "cannot load as a sequence-classification model")
        if model.config.num_labels != 1:
            raise UserError(f"expected a single-score head (num_labels 1), got "
                            f"{model.config.num_labels}", path=self.model_dir)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model
        self.head = None

    def _load_beaver(self) -> None:
        """Backbone from config.json via AutoModel (no remote code); head and backbone weights
        read from safetensors: backbone under `model.`, head `score_head.{weight,bias}`."""
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModel
        from transformers.initialization import no_init_weights

        raw = read_model_config(self.model_dir)
        model_type = raw.get("model_type")
        try:
            config = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items()
                                                         if k != "model_type"})
            with no_init_weights(), torch.device(self.device):
                backbone = AutoModel.from_config(config, dtype=self.dtype)
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"cannot build the backbone of model_type {model_type!r} ({exc})",
                            path=self.model_dir) from None
        expected = set(backbone.state_dict())
        head: dict[str, torch.Tensor] = {}
        norm: dict[str, torch.Tensor] = {}
        seen: set[str] = set()
        unexpected: list[str] = []
        for f in weight_files(self.model_dir):
            with safe_open(str(f), framework="pt", device="cpu") as st:
                part = {}
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if key.startswith("model.") and key[6:] in expected:
                        part[key[6:]] = st.get_tensor(key)
                    elif key.startswith("score_head."):
                        head[key[11:]] = st.get_tensor(key).float()
                    elif key.startswith("normalizer."):
                        norm[key[11:]] = st.get_tensor(key).float()
                    elif not key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved it
                        unexpected.append(key)
            backbone.load_state_dict(part, strict=False)
            seen |= set(part)
        missing = sorted(expected - seen)
        if missing or unexpected or "weight" not in head:
            raise UserError(
                "weights do not match the score-model layout (missing "
                f"{(missing + ([] if 'weight' in head else ['score_head.weight']))[:5]}, "
                f"unexpected {unexpected[:5]})", path=self.model_dir)
        if head["weight"].shape[0] != 1:
            raise UserError(f"score_dim {head['weight'].shape[0]} is not supported (need 1)",
                            path=self.model_dir)
        self.model = backbone.eval()
        self.head = {k: v.to(self.device) for k, v in head.items()}
        self.normalize = _score_normalizer(raw, norm)

    def _texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        if self.layout == "beaver_score":
            # safe-rlhf trains score models on template + answer + EOS and reads the EOS position.
            eos = self.tokenizer.eos_token or ""
            return [BEAVER_TEMPLATE.format(prompt=p, response=r) + eos
                    for p, r in zip(prompts, responses, strict=True)]
        if getattr(self.tokenizer, "chat_template", None):
            return [render_chat(self.tokenizer, [{"role": "user", "content": p},
                                                 {"role": "assistant", "content": r}])
                    for p, r in zip(prompts, responses, strict=True)]
        return [PLAIN_TEMPLATE.format(prompt=p, response=r)
                for p, r in zip(prompts, responses, strict=True)]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        texts = self._texts(prompts, responses)
        # Chat templates already carry their special tokens.
        add_special = self.layout == "beaver_score" or not getattr(self.tokenizer,
                                                                   "chat_template", None)
        # Longest first, so each batch pads little and memory peaks on the first batch.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self._encode([texts[i] for i in idx], add_special).to(self.device)
            out[idx] = self._forward(enc["input_ids"], enc["attention_mask"]).cpu().numpy()
        return out

    def _encode(self, texts: list[str], add_special: bool) -> BatchEncoding:
        """Right-padded ids. A text over `max_length` keeps its first tokens and its last: the
        score is read at the last token, which the models are trained to read at the EOS that
        closes the answer (as training's truncation closes a cut response with EOS); cutting
        from the right would read it mid-answer."""
        ids = self.tokenizer(texts, add_special_tokens=add_special)["input_ids"]
        ids = [x if len(x) <= self.max_length else [*x[:self.max_length - 1], x[-1]]
               for x in ids]
        return self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float()
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = (pos * mask).argmax(dim=1)  # last non-pad token
        end = hidden[torch.arange(len(last), device=hidden.device), last].float()
        return self.normalize(F.linear(end, self.head["weight"], self.head.get("bias"))[:, 0])


def _score_normalizer(config: Mapping[str, Any], buffers: Mapping[str, torch.Tensor]
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """safe-rlhf's output normalisation, applied only when the config sets `do_normalize`
    (reward: shift and scale; cost: scale only, which keeps "> 0 means unsafe"). Stored buffers
    win over the config's mean/var, as they do when safe-rlhf loads a checkpoint."""
    if not config.get("do_normalize"):
        return lambda x: x
    mean = float(buffers["mean"].flatten()[0]) if "mean" in buffers else float(
        (config.get("mean") or [0.0])[0])
    var = float(buffers["var"].flatten()[0]) if "var" in buffers else float(
        (config.get("var") or [1.0])[0])
    std = var ** 0.5 + 1e-8
    kind = config.get("score_type", "reward")
    if kind == "reward":
        return lambda x: (x - mean) / std
    if kind == "cost":
        return lambda x: x / std
    return lambda x: x


class HubJudge:
    """The reward and the cost score model, one in memory at a time: two 7B score models in
    bf16 are 28 GB. A call loads its model, after dropping the other, unless it is the one held;
    the stages score all texts with one model, then all with the other (two loads)."""

    def __init__(self, loaders: Mapping[str, Callable[[], ScoreModel]]) -> None:
        self._loaders = dict(loaders)
        self._held: tuple[str, ScoreModel] | None = None

    def model(self, role: str) -> ScoreModel:
        if self._held is None or self._held[0] != role:
            self._held = None
            gc.collect()  # the other model's memory serves this one
            self._held = (role, self._loaders[role]())
        return self._held[1]

    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.model("reward").score(prompts, responses)

    def cost(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.model("cost").score(prompts, responses)


def load_score_model(source: str, layout: str = "auto", *, revision: str | None = None,
                     batch_size: int = 16, max_length: int = 1024, device: str | None = None,
                     local_files_only: bool = False) -> ScoreModel:
    """A hub id or local directory -> a loaded `ScoreModel`; every failure is one `UserError`."""
    model_dir, _ = resolve_model(source, revision, local_files_only=local_files_only)
    return ScoreModel(model_dir, detect_layout(model_dir, layout), batch_size=batch_size,
                      max_length=max_length, device=device)


def describe_hub_models(cfg: JudgeConfig) -> dict[str, dict[str, Any]]:
    """Resolve both hub models now (downloading if needed) and record what was resolved."""
    out = {}
    for role, source in (("reward", cfg.reward_model), ("cost", cfg.cost_model)):
        assert source is not None  # JudgeConfig checks this for kind: hub
        out[role] = describe_score_model(source, cfg.layout)
    return out


def describe_score_model(source: str, layout: str = "auto") -> dict[str, Any]:
    """Resolve one score model now (downloading if needed) and record what was resolved."""
    model_dir, commit = resolve_model(source)
    return {"source": source, "revision": commit, "path": str(model_dir),
            "layout": detect_layout(model_dir, layout), "fingerprint": model_fingerprint(model_dir)}


def resolve_recorded(info: Mapping[str, Any], what: str) -> Path:
    """The local directory of a model a judge record describes, refusing one that changed since
    the judge stage measured it (`what` names it in the error)."""
    # A pinned commit is normally in the local cache: try it before the network.
    try:
        model_dir, _ = resolve_model(info["source"], info["revision"],
                                     local_files_only=info["revision"] is not None)
    except UserError:
        model_dir, _ = resolve_model(info["source"], info["revision"])
    if model_fingerprint(model_dir) != info["fingerprint"]:
        raise UserError(f"the {what} changed since the judge stage measured its accuracy; "
                        "rerun `safedpo judge`", path=model_dir)
    return model_dir


def build_hub_judge(models: Mapping[str, Mapping[str, Any]], *, max_length: int,
                    batch_size: int = 16, device: str | None = None) -> HubJudge:
    """The hub models that `describe_hub_models` recorded, refusing now any that changed; each
    is loaded when first used (`HubJudge`)."""
    loaders = {}
    for role in ("reward", "cost"):
        info = models[role]
        loaders[role] = partial(ScoreModel, resolve_recorded(info, f"{role} model"),
                                info["layout"], batch_size=batch_size, max_length=max_length,
                                device=device)
    return HubJudge(loaders)
