"""CLIP backbones from open_clip with parameter-efficient fine-tuning (PEFT) branches.

``build_model("clip:<open_clip model name>", ...)`` returns a :class:`ClipModel`: a frozen open_clip model (image
and text towers), the class-name text features of a frozen zero-shot classifier, and one or more *PEFT branches*
holding the only trainable tensors:

* ``prompt`` -- CoOp learnable context (Zhou et al., IJCV 2022): ``n_ctx`` shared context vectors in the text
  encoder's token-embedding space; the class prompt is ``[SOS] ctx_1 .. ctx_n {class name}. [EOS]`` (class token
  at the end, as in FedPuReL and PromptFL);
* ``lora`` -- LoRA (Hu et al., ICLR 2022) on the q / k / v projections of every attention layer of the image
  tower: ``W x + s B A dropout(x)``, A Kaiming-uniform, B zero (so a fresh branch equals zero-shot), with the scale
  ``s = alpha / r`` of the LoRA paper (``lora_scaling="alpha_over_r"``) or ``s = alpha / sqrt(r)``
  (``"alpha_over_sqrt_r"``, the rank-stabilised scale of CLIP-LoRA's loralib that FedPuReL's released code uses:
  at r = 8, alpha = 16 the code's delta is sqrt(8) = 2.83 times fedlt's default);
* ``adapter`` -- CLIP-Adapter (Gao et al., IJCV 2023) on the image feature: ``f' = r A(f) + (1 - r) f`` with a
  two-layer bottleneck MLP A (reduction 4, ReLU) and residual ratio r = 0.2;
* ``attention_adapter`` -- FedCLIP's attention adapter (Lu et al. 2023, arXiv:2302.13485), the adapter of
  FedPuReL's released code: ``f' = softmax(W_2 tanh(W_1 f + b_1) + b_2) * f`` (element-wise), two d x d linear
  layers with biases (2 (d^2 + d) parameters: 525,312 at d = 512), PyTorch's default ``nn.Linear`` initialisation.

Every trainable tensor lives under the ``peft.<branch>.`` state-dict prefix (and ``head.`` for a linear head);
everything else -- the open_clip weights, the frozen text features -- is reported by :meth:`frozen_state_keys`.
The engine loads those once per rank in the workspace model and never aggregates, stores per client or
checkpoints them, so a client's state is only its PEFT tensors (docs/architecture.md section 4, "frozen large
backbones").

Branches: a model starts with the ``global`` branch; methods add more with :meth:`ClipModel.add_branch` (FedPuReL's
personal residual branch, PromptFolio's local prompt) and pick one with :meth:`ClipModel.use_branch`. A branch
named ``None`` is the zero-shot model (no PEFT at all), the teacher of FedPuReL and CLIP2FL.

Weights: ``pretrained: true`` with ``tag`` (an open_clip pretrained tag such as ``openai``, see
``open_clip.list_pretrained()``) downloads through open_clip's Hugging Face cache; ``checkpoint_path`` loads a
local file (clusters without internet). A missing download fails at once with :class:`ClipWeightsUnavailable`
(the CLI turns it into exit status 2). ``clip:fedlt-tiny-clip`` is a tiny random-weight configuration shipped with
fedlt for tests and offline runs (2-layer towers, 32-d embedding, 32 px input); its pretrained tag ``fedlt-digits``
(:mod:`fedlt.models.tiny_clip`) is a contrastive pretraining on the embedded digits' training images, built once
(about 30 s on a CPU) and cached, so the offline configs have a zero-shot teacher that knows something.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.models.base import FedModel
from fedlt.models.timm_model import PretrainedWeightsUnavailable
from fedlt.registry import UnknownNameError

CLIP_PREFIX = "clip:"
PEFT_KINDS = ("prompt", "lora", "adapter", "attention_adapter", "none")
ADAPTER_KINDS = ("adapter", "attention_adapter")  # PEFT on the image feature (after the image tower)
HEAD_KINDS = ("text", "linear")
LORA_SCALINGS = ("alpha_over_r", "alpha_over_sqrt_r")
TEMPLATE_SETS = ("coop", "fedpurel_code")
_CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"

DEFAULT_TEMPLATE = "a photo of a {}."
# Zero-shot prompt templates per dataset (the source's ``name``), ``template_set="coop"`` (default): the paper's
# hand-crafted per-dataset template, taken from CoOp's table (docs/reference.md 4.1); datasets without an entry use
# DEFAULT_TEMPLATE (FedPuReL's code has no Places-LT entry, docs/reference.md 4.8).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "cifar10": (DEFAULT_TEMPLATE,),
    "cifar100": (DEFAULT_TEMPLATE,),
    "imagenet_lt": (DEFAULT_TEMPLATE,),
    "places_lt": (DEFAULT_TEMPLATE,),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "food101": ("a photo of {}, a type of food.",),
    "dtd": ("a photo of a {} pattern.",),
    "mnist": ('a photo of the number: "{}".',),
    "digits": ('a photo of the number: "{}".',),
    "fashionmnist": (DEFAULT_TEMPLATE,),
}
# ``template_set="fedpurel_code"``: the templates of FedPuReL's released code (its zero-shot teacher's table, keyed by
# the Dassl dataset names OxfordPets, Food101 and DescribableTextures -- the name its DTD config sets; an unused
# "DTD_LT" key of its prompt trainer would give "a photo of a {} pattern."). Pets and food put the category first,
# DTD reads "a texture of"; every other dataset is as in TEMPLATES.
FEDPUREL_CODE_TEMPLATES: dict[str, tuple[str, ...]] = {
    **TEMPLATES,
    "oxford_pets": ("a type of pet, a photo of a {}.",),
    "food101": ("a type of food, a photo of {}.",),
    "dtd": ("a texture of {}.",),
}
_TEMPLATE_TABLES = {"coop": TEMPLATES, "fedpurel_code": FEDPUREL_CODE_TEMPLATES}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipModel(Protocol):
    """What fedlt uses of an open_clip ``CLIP`` model (open_clip has no type information).

    The model is an ``nn.Module``: its towers, the text tower's parts that :meth:`ClipModel.prompt_text_features`
    runs one by one, and the ``nn.Module`` methods fedlt calls on it.
    """

    visual: nn.Module
    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: nn.Module
    attn_mask: Tensor | None
    ln_final: nn.LayerNorm
    text_projection: Tensor | nn.Linear | None
    logit_scale: Tensor

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor: ...

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor: ...

    def eval(self) -> nn.Module: ...

    def train(self, mode: bool = True) -> nn.Module: ...

    def requires_grad_(self, requires_grad: bool = True) -> nn.Module: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_dict(self) -> dict[str, Any]: ...


class ClipWeightsUnavailable(PretrainedWeightsUnavailable):
    """Pretrained open_clip weights could not be downloaded or loaded."""

    def __init__(self, model_name: str, tag: str | None, cause: BaseException) -> None:
        RuntimeError.__init__(
            self,
            f"pretrained weights {tag!r} for open_clip model {model_name!r} could not be loaded: "
            f"{type(cause).__name__}: {cause}. To fix it: connect to the internet once so that open_clip caches "
            "them (HF_HOME); or download the checkpoint elsewhere and pass `checkpoint_path: /path/to/file` in "
            "model.kwargs; or use random weights with `pretrained: false`.",
        )
        self.model_name = model_name


def register_fedlt_configs() -> None:
    """Makes fedlt's bundled open_clip configurations (``fedlt-tiny-clip``) known to open_clip."""
    import open_clip

    if "fedlt-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def create_open_clip(model_name: str, pretrained: bool = False, tag: str | None = "openai",
                     checkpoint_path: str | os.PathLike[str] | None = None) -> OpenClipModel:
    """Builds an open_clip model with random or pretrained weights, failing fast when weights are unavailable.

    Args:
        model_name: open_clip model name (``open_clip.list_models()``), e.g. ``ViT-B-16``.
        pretrained: load the weights named by ``tag``.
        tag: open_clip pretrained tag (``open_clip.list_pretrained_tags_by_model(model_name)``); for
            ``fedlt-tiny-clip`` also ``fedlt-digits``, fedlt's offline digits pretraining (``fedlt.models.tiny_clip``).
        checkpoint_path: a local checkpoint file (overrides ``tag``; implies pretrained weights).

    Raises:
        UnknownNameError: open_clip does not know ``model_name`` or the model has no weights ``tag``.
        ClipWeightsUnavailable: the weights could not be downloaded or read.
    """
    import open_clip

    from fedlt.models.tiny_clip import DIGITS_TAG, TINY_CLIP, digits_checkpoint

    register_fedlt_configs()
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        similar = [m for m in open_clip.list_models() if model_name.lower() in m.lower()][:10]
        hint = f"; similar names: {', '.join(similar)}" if similar else ""
        raise UnknownNameError(f"unknown open_clip model {model_name!r}; see open_clip.list_models(){hint}")
    weights: str | None = None
    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise ClipWeightsUnavailable(model_name, str(checkpoint_path),
                                         FileNotFoundError(f"no such file: {checkpoint_path}"))
        weights = str(checkpoint_path)
    elif pretrained and (model_name, tag) == (TINY_CLIP, DIGITS_TAG):
        checkpoint_path = digits_checkpoint(model_name)  # fedlt's offline pretraining: built once, then cached
        weights = str(checkpoint_path)
    elif pretrained:
        tags = [*open_clip.list_pretrained_tags_by_model(model_name),
                *([DIGITS_TAG] if model_name == TINY_CLIP else [])]
        if tag not in tags:
            raise UnknownNameError(f"open_clip model {model_name!r} has no pretrained weights {tag!r}; "
                                   f"valid tags: {', '.join(tags) or 'none'}")
        weights = tag
    # open_clip warns on the root logger that a model without weights is random: that is what was asked for.
    quiet = logging.getLogger().level
    if weights is None:
        logging.getLogger().setLevel(logging.ERROR)
    try:
        with _offline_unless_hub_reachable(weights is not None and checkpoint_path is None):
            model = open_clip.create_model(model_name, pretrained=weights, require_pretrained=weights is not None)
    except (OSError, RuntimeError, ValueError) as err:  # hub / URL / file / state-dict errors
        if weights is None:
            raise
        raise ClipWeightsUnavailable(model_name, weights, err) from err
    finally:
        logging.getLogger().setLevel(quiet)
    return model


@contextlib.contextmanager
def _offline_unless_hub_reachable(check: bool, timeout: float = 3.0) -> Iterator[None]:
    """Puts huggingface_hub in offline mode for the block when its host cannot be reached within ``timeout``.

    Without this, a machine without internet spends about a minute in huggingface_hub's retry loop before failing;
    offline mode still loads weights that are already cached and fails at once otherwise.
    """
    if not check or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        yield
        return
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
    except ImportError:  # open_clip then downloads from the URL itself
        yield
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    previous = constants.HF_HUB_OFFLINE
    if not reachable:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def cosine_logits(scale: Tensor | float, features: Tensor, text: Tensor) -> Tensor:
    """``scale * features @ text^T`` in float32, also under autocast: CLIP logits reach 20-35 with scale ~100, where
    bfloat16's step is 0.125-0.25, which would distort the softmax (FedPuReL's TKL and CE, KD targets)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        scale = scale.float() if isinstance(scale, Tensor) else float(scale)
        return scale * features.float() @ text.float().t()


def _check_args(peft: str, head: str, head_init: str, n_ctx: int, lora_rank: int, adapter_reduction: int,
                lora_targets: Sequence[str], lora_scaling: str, template_set: str) -> None:
    """Validates :class:`ClipModel`'s choices with messages naming the valid values."""
    if peft not in PEFT_KINDS:
        raise ValueError(f"unknown peft {peft!r}; valid: {', '.join(PEFT_KINDS)}")
    if lora_scaling not in LORA_SCALINGS:
        raise ValueError(f"unknown lora_scaling {lora_scaling!r}; valid: {', '.join(LORA_SCALINGS)}")
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"unknown template_set {template_set!r}; valid: {', '.join(TEMPLATE_SETS)}")
    if head not in HEAD_KINDS:
        raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEAD_KINDS)}")
    if head_init not in ("zeroshot", "random"):
        raise ValueError(f"unknown head_init {head_init!r}; valid: zeroshot, random")
    if n_ctx < 1 or lora_rank < 1 or adapter_reduction < 1:
        raise ValueError("n_ctx, lora_rank and adapter_reduction must be >= 1")
    if set(lora_targets) - {"q", "k", "v"} or not lora_targets:
        raise ValueError(f"lora_targets must be a non-empty subset of q, k, v; got {list(lora_targets)}")


def lora_scale(alpha: float, rank: int, scaling: str = "alpha_over_r") -> float:
    """The LoRA delta's scale: ``alpha / r`` (LoRA paper) or ``alpha / sqrt(r)`` (CLIP-LoRA's loralib)."""
    if scaling not in LORA_SCALINGS:
        raise ValueError(f"unknown lora_scaling {scaling!r}; valid: {', '.join(LORA_SCALINGS)}")
    return float(alpha) / (float(rank) if scaling == "alpha_over_r" else math.sqrt(rank))


def _embed_dim(clip: OpenClipModel) -> int:
    """D, the size of the joint image--text embedding (the text projection's output, or the text width)."""
    proj = clip.text_projection
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    return int(proj.shape[-1]) if proj is not None else int(clip.token_embedding.embedding_dim)


def _templates(templates: Sequence[str] | None, dataset: str | None, template_set: str = "coop") -> tuple[str, ...]:
    """The zero-shot templates: ``templates``, else the dataset's in the ``template_set`` table, else the default."""
    table = _TEMPLATE_TABLES[template_set]
    chosen = tuple(templates) if templates else table.get((dataset or "").lower(), (DEFAULT_TEMPLATE,))
    for t in chosen:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return chosen


class _BranchConfig(TypedDict):
    """The sizes :class:`ClipModel` builds every :class:`_PeftBranch` with."""

    text_width: int
    embed_dim: int
    n_ctx: int
    lora_rank: int
    lora_targets: tuple[str, ...]
    adapter_reduction: int


class _PeftBranch(nn.Module):
    """The trainable tensors of one branch (prompt context, LoRA factors, adapter), built by :class:`ClipModel`."""

    def __init__(self, kind: str, text_width: int, embed_dim: int, vision_layers: int, vision_width: int,
                 n_ctx: int, ctx_init: Tensor | None, lora_rank: int, lora_targets: Sequence[str],
                 adapter_reduction: int) -> None:
        super().__init__()
        if kind == "prompt":
            if ctx_init is not None:
                self.ctx = nn.Parameter(ctx_init.clone())
            else:
                self.ctx = nn.Parameter(torch.empty(n_ctx, text_width).normal_(0.0, 0.02))
        elif kind == "lora":
            self.lora = nn.ParameterDict()
            for layer in range(vision_layers):
                for t in lora_targets:
                    a = torch.empty(lora_rank, vision_width)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    self.lora[f"l{layer}_{t}_A"] = nn.Parameter(a)
                    self.lora[f"l{layer}_{t}_B"] = nn.Parameter(torch.zeros(vision_width, lora_rank))
        elif kind == "adapter":
            hidden = max(1, embed_dim // adapter_reduction)
            self.adapter = nn.Sequential(nn.Linear(embed_dim, hidden, bias=False), nn.ReLU(inplace=True),
                                         nn.Linear(hidden, embed_dim, bias=False), nn.ReLU(inplace=True))
        elif kind == "attention_adapter":
            # FedCLIP's attention vector over the feature dimensions (multiplied into the feature by ClipModel).
            self.attn_adapter = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(),
                                              nn.Linear(embed_dim, embed_dim), nn.Softmax(dim=-1))


class _LoRAAttention(nn.Module):
    """Self-attention of one open_clip block with the active branch's LoRA deltas on q, k and v.

    Wraps the block's ``nn.MultiheadAttention`` (kept as ``base``, frozen) and accepts its call signature. Without
    an active LoRA branch it calls ``base`` unchanged.
    """

    def __init__(self, base: nn.MultiheadAttention, layer: int, owner: ClipModel) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.__dict__["_owner"] = owner  # not a submodule (the owner contains this module)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        owner: ClipModel = self.__dict__["_owner"]
        lora = owner._active_lora()
        if lora is None:
            return self.base(query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs)
        base = self.base
        x = query if base.batch_first else query.transpose(0, 1)  # (B, N, d)
        d, h = base.embed_dim, base.num_heads
        qkv = F.linear(x, base.in_proj_weight, base.in_proj_bias)
        xd = owner.lora_dropout(x)
        deltas: list[Tensor | None] = []
        for t in ("q", "k", "v"):
            a = lora.get(f"l{self.layer}_{t}_A")
            if a is None:
                deltas.append(None)
                continue
            deltas.append((xd @ a.t()) @ lora[f"l{self.layer}_{t}_B"].t() * owner.lora_scale)
        q, k, v = (part if delta is None else part + delta for part, delta in zip(qkv.split(d, dim=-1), deltas))
        b, n = x.shape[0], x.shape[1]
        q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
        mask = attn_mask.to(q.dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        drop = base.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        out = base.out_proj(out.transpose(1, 2).reshape(b, n, d))
        return (out if base.batch_first else out.transpose(0, 1)), None


class ClipModel(FedModel):
    """Frozen open_clip model + PEFT branches, behind the FedModel features/head split.

    ``forward_features(x)`` is the L2-normalised image embedding of the active branch (LoRA in the image tower and
    the adapter apply); ``head`` maps it to logits: the text head gives ``logit_scale * <f, t_c>`` with the class
    text features t_c of the active branch (learned-prompt text features, or the frozen zero-shot ones), a linear
    head is an ``nn.Linear`` (trainable, shared), initialised from the zero-shot classifier by default.

    Inputs are expected normalised with CLIP's mean and std; batches of another size are resized (bicubic) to the
    image tower's input size and single-channel batches are repeated to three channels.

    Args:
        model_name: open_clip model name (``ViT-B-16``, ``RN50``, ``fedlt-tiny-clip``, ``hf-hub:...``).
        num_classes: C.
        class_names: the C class names (text prompts); defaults to ``"0" .. "C-1"``.
        dataset: the data source's name, selects the zero-shot templates in :data:`TEMPLATES`.
        pretrained: load the pretrained weights ``tag``.
        tag: open_clip pretrained tag (default ``openai``).
        checkpoint_path: local checkpoint file instead of a download.
        templates: zero-shot prompt templates with one ``{}`` (overrides the dataset's); the text features are the
            normalised mean over templates (CLIP's prompt ensembling).
        template_set: the per-dataset template table when ``templates`` is not given: ``coop`` (:data:`TEMPLATES`,
            CoOp's hand-crafted table, fedlt's reading of FedPuReL's paper) or ``fedpurel_code``
            (:data:`FEDPUREL_CODE_TEMPLATES`, the table of FedPuReL's released code: other Pets, Food-101 and DTD
            templates).
        peft: ``prompt`` (CoOp context), ``lora`` (image-tower q/k/v), ``adapter`` (CLIP-Adapter),
            ``attention_adapter`` (FedCLIP's attention adapter, FedPuReL's code) or ``none``.
        n_ctx: number of learnable context tokens (prompt PEFT; FedPuReL/PromptFL: 4, CoOp: 16).
        ctx_init: initialise the context from these words' token embeddings (e.g. ``"a photo of a"``; its token
            count sets ``n_ctx``) instead of N(0, 0.02^2).
        lora_rank: LoRA rank r (FedPuReL: 8).
        lora_alpha: LoRA alpha (FedPuReL: 16); the delta is scaled by ``lora_scaling``.
        lora_scaling: ``alpha_over_r`` (alpha / r, the LoRA paper's rule) or ``alpha_over_sqrt_r`` (alpha / sqrt(r),
            CLIP-LoRA's loralib, which FedPuReL's released code uses).
        lora_dropout: dropout on the LoRA input (FedPuReL: 0.25).
        lora_targets: which projections get LoRA factors, a subset of ``q``, ``k``, ``v``.
        adapter_reduction: bottleneck reduction of the adapter MLP.
        adapter_ratio: residual ratio r of the adapter (CLIP-Adapter: 0.2).
        head: ``text`` (cosine classifier over class text features) or ``linear`` (a trainable linear classifier
            on the image embedding, for FedAvg / Fed-GraB / FedRoD ... on CLIP features).
        head_init: ``zeroshot`` (linear head = logit_scale x zero-shot text features, bias 0) or ``random``.
        in_channels: input channels of the data (1 is repeated to 3).
        image_size: the data's image side (informational: batches are resized to the tower's input size).
    """

    clip: OpenClipModel
    # Buffers: the normalised zero-shot text features (C, D); with prompt PEFT also the class prompts' tokens
    # (C, L) and their frozen token embeddings before (C, 1, width) and after the context.
    zs_text: Tensor
    prompt_tokens: Tensor
    prompt_prefix: Tensor
    prompt_suffix: Tensor

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        dataset: str | None = None,
        pretrained: bool = False,
        tag: str | None = "openai",
        checkpoint_path: str | None = None,
        templates: Sequence[str] | None = None,
        template_set: str = "coop",
        peft: str = "prompt",
        n_ctx: int = 4,
        ctx_init: str | None = None,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_scaling: str = "alpha_over_r",
        lora_dropout: float = 0.25,
        lora_targets: Sequence[str] = ("q", "k", "v"),
        adapter_reduction: int = 4,
        adapter_ratio: float = 0.2,
        head: str = "text",
        head_init: str = "zeroshot",
        in_channels: int = 3,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        _check_args(peft, head, head_init, n_ctx, lora_rank, adapter_reduction, lora_targets, lora_scaling,
                    template_set)
        names = [str(c) for c in (class_names if class_names else range(num_classes))]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        import open_clip

        self.model_name = model_name
        self.num_classes = num_classes
        self.class_names = names
        self.peft_kind = peft
        self.head_kind = head
        self.clip = create_open_clip(model_name, pretrained, tag, checkpoint_path)
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name) if not model_name.startswith("local-dir:") else None
        self.templates = _templates(templates, dataset, template_set)
        visual = self.clip.visual
        size = getattr(visual, "image_size", 224)
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.num_features = _embed_dim(self.clip)
        self.text_width = int(self.clip.token_embedding.embedding_dim)
        self.lora_scaling = lora_scaling
        self.lora_scale = lora_scale(lora_alpha, lora_rank, lora_scaling)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.adapter_ratio = float(adapter_ratio)
        self._cfg = _BranchConfig(text_width=self.text_width, embed_dim=self.num_features, n_ctx=n_ctx,
                                  lora_rank=lora_rank, lora_targets=tuple(lora_targets),
                                  adapter_reduction=adapter_reduction)
        self._branch: str | None = "global"
        # branch -> ((branch, context data_ptr, context version), its prompt text features)
        self._text_cache: dict[str | None, tuple[tuple[str | None, int, int], Tensor]] = {}

        zs = self._encode_class_texts()
        self.register_buffer("zs_text", zs, persistent=False)  # (C, D) normalised zero-shot text features
        ctx_vec = None
        if peft == "prompt":
            ctx_vec = self._prepare_prompts(n_ctx, ctx_init)
        self._ctx_init = ctx_vec
        resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        self._vision_layers = len(resblocks) if resblocks is not None else 0
        self._vision_width = 0
        if peft == "lora":
            if resblocks is None:
                raise ValueError(f"peft 'lora' needs a ViT image tower; {model_name!r} has none")
            for i, block in enumerate(resblocks):
                block.attn = _LoRAAttention(block.attn, i, self)
            self._vision_width = int(resblocks[0].attn.base.embed_dim)
        self.peft = nn.ModuleDict()
        self.add_branch("global")
        self.head = self._build_head(head, head_init)

    def _build_head(self, head: str, head_init: str) -> nn.Module:
        if head == "text":
            return _TextHead(self)
        linear = nn.Linear(self.num_features, self.num_classes)
        if head_init == "zeroshot":
            with torch.no_grad():
                linear.weight.copy_(self.zs_text * self.clip.logit_scale.exp())
                linear.bias.zero_()
        return linear

    # -- branches ------------------------------------------------------------------------------------------
    @property
    def branches(self) -> list[str]:
        """Names of the PEFT branches."""
        return list(self.peft.keys())

    def add_branch(self, name: str) -> None:
        """Adds a PEFT branch with a fresh initialisation (drawn from the global RNG) of the model's PEFT kind."""
        if name in self.peft:
            raise ValueError(f"branch {name!r} exists")
        device = self.zs_text.device
        branch = _PeftBranch(self.peft_kind, vision_layers=self._vision_layers, vision_width=self._vision_width,
                             ctx_init=self._ctx_init, **self._cfg)
        self.peft[name] = branch.to(device)

    @contextlib.contextmanager
    def use_branch(self, name: str | None) -> Iterator[None]:
        """Within the block, forward passes use branch ``name`` (``None``: no PEFT, the zero-shot model)."""
        if name is not None and name not in self.peft:
            raise KeyError(f"no branch {name!r}; branches: {', '.join(self.peft)}")
        prev, self._branch = self._branch, name
        try:
            yield
        finally:
            self._branch = prev

    def _active(self) -> _PeftBranch | None:
        if self._branch is None:
            return None
        branch = self.peft[self._branch]
        assert isinstance(branch, _PeftBranch)  # add_branch puts only those in peft
        return branch

    def _active_lora(self) -> nn.ParameterDict | None:
        branch = self._active()
        return getattr(branch, "lora", None) if branch is not None else None

    def frozen_state_keys(self) -> list[str]:
        """State-dict keys of the frozen backbone: loaded once per rank, never aggregated, stored or checkpointed."""
        return [k for k in self.state_dict() if not k.startswith(("peft.", "head."))]

    def train(self, mode: bool = True) -> ClipModel:
        super().train(mode)
        self.clip.eval()  # the frozen towers never use dropout / batch statistics
        for module in self.clip.modules():
            if isinstance(module, _LoRAAttention):
                module.training = mode  # (attention dropout of the wrapped layer is 0 in CLIP anyway)
        return self

    # -- text side -----------------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> Tensor:
        if self.tokenizer is None:
            raise ValueError("this open_clip model has no tokenizer; text features need one")
        return self.tokenizer(texts).to(self.clip.token_embedding.weight.device)

    @torch.no_grad()
    def _encode_class_texts(self) -> Tensor:
        feats = []
        for template in self.templates:
            tokens = self._tokenize([template.format(name.replace("_", " ")) for name in self.class_names])
            feats.append(F.normalize(self.clip.encode_text(tokens), dim=-1))
        return F.normalize(torch.stack(feats).mean(0), dim=-1)

    @torch.no_grad()
    def _prepare_prompts(self, n_ctx: int, ctx_init: str | None) -> Tensor | None:
        """Tokenises ``"X .. X {name}."`` once; keeps the frozen prefix (SOS) and suffix (name, EOS, padding)."""
        init = None
        if ctx_init:
            words = ctx_init.replace("_", " ")
            n_ctx = int((self._tokenize([words])[0] > 0).sum()) - 2
            tokens = self._tokenize([words])
            init = self.clip.token_embedding(tokens)[0, 1 : 1 + n_ctx].clone()
            self._cfg["n_ctx"] = n_ctx
        placeholder = " ".join(["X"] * n_ctx)
        tokens = self._tokenize([f"{placeholder} {name.replace('_', ' ')}." for name in self.class_names])
        embeds = self.clip.token_embedding(tokens)
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        self.register_buffer("prompt_prefix", embeds[:, :1].clone(), persistent=False)
        self.register_buffer("prompt_suffix", embeds[:, 1 + n_ctx :].clone(), persistent=False)
        return init

    def prompt_text_features(self, ctx: Tensor) -> Tensor:
        """Normalised class text features (C, D) for the context vectors ``ctx`` (n_ctx, width) (CoOp)."""
        clip = self.clip
        c = self.prompt_prefix.shape[0]
        x = torch.cat([self.prompt_prefix, ctx.unsqueeze(0).expand(c, -1, -1), self.prompt_suffix], dim=1)
        x = x + clip.positional_embedding.to(x.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(c, device=x.device), self.prompt_tokens.argmax(dim=-1)]
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x, dim=-1)

    def text_features(self, branch: str | None = None) -> Tensor:
        """Class text features (C, D) of ``branch`` (learned prompts) or the zero-shot ones.

        Without gradients (evaluation) the prompt features are cached until the context tensor changes.
        """
        b = self.peft[branch] if branch is not None else None
        ctx = getattr(b, "ctx", None) if b is not None else None
        if ctx is None:
            return self.zs_text
        if torch.is_grad_enabled() and ctx.requires_grad:
            return self.prompt_text_features(ctx)
        key = (branch, ctx.data_ptr(), ctx._version)
        cached = self._text_cache.get(branch)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.prompt_text_features(ctx))
            self._text_cache[branch] = cached
        return cached[1]

    @property
    def logit_scale(self) -> Tensor:
        """exp(CLIP's learned temperature), about 100 for pretrained models."""
        return self.clip.logit_scale.exp()

    # -- image side ----------------------------------------------------------------------------------------
    def _prepare_input(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return x

    def encode(self, x: Tensor, branch: str | None = None) -> Tensor:
        """Normalised image features (B, D) with ``branch``'s LoRA and adapter (``None``: zero-shot features)."""
        with self.use_branch(branch):
            x = self._prepare_input(x)
            lora = self._active_lora() is not None
            with contextlib.nullcontext() if lora else torch.no_grad():
                f = self.clip.encode_image(x)
            b = self._active()
            adapter = getattr(b, "adapter", None) if b is not None else None
            if adapter is not None:
                f = self.adapter_ratio * adapter(f) + (1.0 - self.adapter_ratio) * f
            attention = getattr(b, "attn_adapter", None) if b is not None else None
            if attention is not None:
                f = attention(f) * f
            return F.normalize(f, dim=-1)

    def image_depends_on_branch(self) -> bool:
        """Whether the image features differ between branches (LoRA or adapter PEFT)."""
        return self.peft_kind in ("lora", *ADAPTER_KINDS)

    def classify(self, features: Tensor, branch: str | None = None) -> Tensor:
        """Logits (B, C) of normalised ``features`` with ``branch``'s classifier."""
        if self.head_kind == "linear":
            return self.head(features)
        return cosine_logits(self.logit_scale, features, self.text_features(branch))

    def zero_shot_logits(self, x: Tensor) -> Tensor:
        """Logits of the frozen zero-shot CLIP (no PEFT, zero-shot text features), without gradients."""
        with torch.no_grad():
            return cosine_logits(self.logit_scale, self.encode(x, None), self.zs_text)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.encode(x, self._branch)


class _TextHead(nn.Module):
    """The cosine classifier over the active branch's class text features (no parameters of its own)."""

    def __init__(self, owner: ClipModel) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner

    def forward(self, features: Tensor) -> Tensor:
        owner: ClipModel = self.__dict__["_owner"]
        return owner.classify(features, owner._branch)


def build_clip(model_name: str, num_classes: int, in_channels: int = 3, image_size: int = 224,
               pretrained: bool = False, **kwargs: Any) -> ClipModel:
    """``build_model("clip:<name>", ...)`` entry point."""
    return ClipModel(model_name, num_classes, pretrained=pretrained, in_channels=in_channels,
                     image_size=image_size, **kwargs)
