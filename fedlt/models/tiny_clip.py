"""Offline "pretraining" of the tiny CLIP (``clip:fedlt-tiny-clip``) on fedlt's embedded digits.

Random CLIP weights carry no knowledge: a random zero-shot classifier is at chance and random ViT features are
nearly collinear, so offline demos with the tiny CLIP say nothing. The pretrained tag ``fedlt-digits`` gives the
tiny CLIP real (if narrow) image--text knowledge without any download: a short contrastive (CLIP) training on
image--caption pairs made from :class:`fedlt.data.EmbeddedDigits` *training* images (the test images and their
held-out source digits are never seen), built deterministically on first use and cached like the embedded
datasets (``$FEDLT_CACHE`` or ``~/.cache/fedlt``).

Recipe (:class:`DigitsPretraining`): the 10,000 EmbeddedDigits training images at 32 px, normalised with CLIP's
mean / std (grey repeated to three channels), lightly augmented (random-resized crops with small scale and aspect
changes, i.e. shifts and zooms, and with probability 1/2 a bicubic down-and-up resampling through 16 px, the blur
of upsampled low-resolution data); every image is paired with one random caption of its digit
(:data:`CAPTION_TEMPLATES` x the names ``"0"`` .. ``"9"`` and ``"zero"`` .. ``"nine"``), tokenised by the model's
open_clip tokenizer. The loss is CLIP's symmetric InfoNCE (cross-entropy both ways over the in-batch image--text
similarities scaled by the model's learnable ``logit_scale``) with two adaptations to ten classes and a random
start: pairs showing the same digit are all positives (a uniform target over them, since a batch holds ~25 of
each), and the embeddings are batch-centred before the cosine (a random tower maps every input to nearly the same
direction, cosine > 0.99, and plain InfoNCE then collapses to equal features at loss log B instead of learning);
after training the mean embeddings are folded into the final LayerNorm biases, so the saved model outputs the
centred embeddings as a plain open_clip model. AdamW, linear warm-up then cosine decay, a fixed number of steps
(~30 s on one CPU core); all randomness comes from a seeded ``torch.Generator`` (the global RNG is only used, and
then restored, for open_clip's initialisation). The build is deterministic for a given machine and thread count.

Usage::

    create_open_clip("fedlt-tiny-clip", pretrained=True, tag="fedlt-digits")   # or, in a config:
    model: {name: clip:fedlt-tiny-clip, pretrained: true, kwargs: {tag: fedlt-digits}}
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from fedlt.models.clip import OpenClipModel

__all__ = [
    "CAPTION_TEMPLATES",
    "DIGITS_TAG",
    "DIGIT_NAMES",
    "RECIPE_VERSION",
    "TINY_CLIP",
    "DigitsPretraining",
    "digit_captions",
    "digits_checkpoint",
    "digits_checkpoint_path",
    "digits_zero_shot_accuracy",
    "train_digits_clip",
]

TINY_CLIP = "fedlt-tiny-clip"
DIGITS_TAG = "fedlt-digits"
RECIPE_VERSION = 1
"""Bumped whenever the recipe (data, captions, loss, optimiser) changes, so stale checkpoints are never reused."""

last_build_s: float | None = None
"""Seconds of this process's last build of the checkpoint (None: none built), for reporting."""

CAPTION_TEMPLATES: tuple[str, ...] = (
    'a photo of the number: "{}".',
    "a photo of a {}.",
    "a photo of the digit {}.",
    "the digit {}",
    "the number {}",
    "a handwritten {}",
    "a handwritten digit {}.",
    "an image of a {}.",
)
DIGIT_NAMES: tuple[tuple[str, ...], ...] = tuple(
    (str(d), word)
    for d, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
)


@dataclass(frozen=True)
class DigitsPretraining:
    """The training recipe of the ``fedlt-digits`` weights (every field is part of the cache key).

    Attributes:
        steps: optimiser steps.
        batch_size: image--caption pairs per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not on gains, biases, embeddings and ``logit_scale``).
        warmup: linear warm-up steps, then a cosine decay to 0.
        scale_lr_mult: learning-rate multiplier of ``logit_scale`` (a log-temperature moves little at ``lr``).
        scale_lr_mult: float = 1.0
    crop_scale: area range of the random-resized crop.
        lowres_prob: probability of the 16 px down-and-up resampling.
        train_per_class: EmbeddedDigits training images per class (at 32 px).
        seed: seed of the initialisation, the batches, the augmentation and the captions.
    """

    steps: int = 300
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 20
    scale_lr_mult: float = 10.0
    crop_scale: tuple[float, float] = (0.6, 1.0)
    lowres_prob: float = 0.5
    train_per_class: int = 1000
    seed: int = 0


def digit_captions() -> tuple[list[str], Tensor]:
    """All captions (templates x name forms x digits) and their digit labels (int64)."""
    texts, labels = [], []
    for d, names in enumerate(DIGIT_NAMES):
        for name in names:
            for template in CAPTION_TEMPLATES:
                texts.append(template.format(name))
                labels.append(d)
    return texts, torch.tensor(labels, dtype=torch.int64)


def _config_json(model_name: str) -> str:
    path = Path(__file__).resolve().parent / "clip_configs" / f"{model_name}.json"
    return json.dumps(json.loads(path.read_text()), sort_keys=True)


def digits_checkpoint_path(recipe: DigitsPretraining | None = None, root: str | Path | None = None,
                           model_name: str = TINY_CLIP) -> Path:
    """Cache file of the weights: keyed by a hash of the model config, the recipe (and its version) and the seed."""
    from fedlt.data.digits import DIGITS_VERSION
    from fedlt.data.sources import default_cache_dir

    recipe = recipe or DigitsPretraining()
    key = json.dumps({"config": _config_json(model_name), "recipe": asdict(recipe), "version": RECIPE_VERSION,
                      "digits_version": DIGITS_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(root) if root is not None else default_cache_dir()
    return root / f"{model_name}-{DIGITS_TAG}-s{recipe.seed}-v{RECIPE_VERSION}-{digest}.pt"


def _new_model(model_name: str, seed: int) -> OpenClipModel:
    """A randomly initialised open_clip model, its initialisation drawn from ``seed`` (global RNG restored)."""
    from fedlt.models.clip import create_open_clip

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # CPU only: fork_rng restores it
        return create_open_clip(model_name, pretrained=False)


def _tokenizer(model_name: str):
    import open_clip

    from fedlt.models.clip import register_fedlt_configs

    register_fedlt_configs()  # else open_clip falls back to a 77-token tokenizer for fedlt's configs
    return open_clip.get_tokenizer(model_name)


def _normalise(x: Tensor) -> Tensor:
    """uint8-valued float (B, 1, H, W) in [0, 255] -> CLIP-normalised (B, 3, H, W)."""
    from fedlt.models.clip import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1) * 255.0
    return (x.expand(-1, 3, -1, -1) - mean) / std


def _lowres(x: Tensor, size: int = 16) -> Tensor:
    side = x.shape[-1]
    small = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small.clamp(0.0, 255.0), size=(side, side), mode="bicubic", align_corners=False).clamp(0, 255)


def _encode_text(model: OpenClipModel, tokens: Tensor, token_embeds: Tensor) -> Tensor:
    """``model.encode_text(tokens)`` (argmax / EOT pooling) on the sequences cut after their last EOT token.

    The text tower is causal, so the EOT feature does not depend on the padding after it: cutting the padding
    gives the same features at a fraction of the cost. ``token_embeds`` (B, L, width) are the token embeddings.
    """
    assert model.attn_mask is not None  # a causal text tower
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = token_embeds[:, :length] + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]
    proj = model.text_projection
    if proj is None:  # as in encode_text: no projection
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


@torch.no_grad()
def _fold_means(model: OpenClipModel, images: Tensor, tokens: Tensor) -> None:
    """Makes the towers output the centred embeddings they were trained on: subtracts the mean image embedding
    of ``images`` (uint8, unaugmented; every 5th) and the mean text embedding of ``tokens`` (all captions, each
    equally likely) through the biases of the final LayerNorms (exact: ``bias -= mean @ pinv(projection)``).
    """
    model.eval()
    images = images[::5]
    img = torch.cat([model.encode_image(_normalise(images[i : i + 1024].to(torch.float32)))
                     for i in range(0, images.shape[0], 1024)])
    txt = model.encode_text(tokens)
    # The tiny CLIP's towers: a ViT image tower and matrix projections (open_clip's defaults).
    ln_post, img_proj, txt_proj = model.visual.ln_post, model.visual.proj, model.text_projection
    assert isinstance(ln_post, nn.LayerNorm) and isinstance(img_proj, Tensor) and isinstance(txt_proj, Tensor)
    for bias, proj, mean in ((ln_post.bias, img_proj, img.mean(0)), (model.ln_final.bias, txt_proj, txt.mean(0))):
        bias.sub_((mean.to(torch.float64) @ torch.linalg.pinv(proj.to(torch.float64))).to(bias.dtype))


def _param_groups(model: OpenClipModel, recipe: DigitsPretraining, rows: nn.Parameter) -> list[dict]:
    """AdamW groups: weights (decayed); gains, biases and embeddings incl. ``rows``; ``logit_scale``."""
    decay: list[nn.Parameter] = []
    no_decay = [rows]
    for name, p in model.named_parameters():
        if p.requires_grad and name != "logit_scale":
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": recipe.weight_decay, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": [model.logit_scale], "weight_decay": 0.0, "lr_mult": recipe.scale_lr_mult}]


def train_digits_clip(model: OpenClipModel, images: Tensor, labels: Tensor, recipe: DigitsPretraining,
                      tokenizer: Callable[[list[str]], Tensor], steps: int | None = None) -> list[float]:
    """Contrastive training of ``model`` in place on digit images and their captions (see the module docstring).

    Args:
        model: an open_clip CLIP model (argmax / EOT text pooling); left in eval mode.
        images: uint8 (N, 1, H, W) training images.
        labels: (N,) digit labels.
        recipe: the recipe (batch size, schedule, augmentation, seed).
        tokenizer: the model's open_clip tokenizer.
        steps: stop after this many steps (default ``recipe.steps``; the schedule always spans ``recipe.steps``).

    Returns:
        The loss of every step.
    """
    from fedlt.data.transforms import ImageAugment

    if getattr(model, "text_pool_type", "argmax") != "argmax":
        raise ValueError("the digits pretraining needs a CLIP text tower with argmax (EOT) pooling")
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    texts, text_labels = digit_captions()
    tokens = tokenizer(texts)
    captions_of = torch.stack([torch.nonzero(text_labels == d).flatten() for d in range(len(DIGIT_NAMES))])
    # Only the rows of the tokens in the captions get gradients: train those as a small parameter (AdamW over
    # the whole 49408-row table would cost more than the towers) and write them back at the end.
    used, remap = torch.unique(tokens, return_inverse=True)
    table = model.token_embedding.weight
    rows = nn.Parameter(table.detach()[used].clone())
    augment = ImageAugment(scale=recipe.crop_scale, ratio=(0.8, 1.25), hflip=False, interpolation="bilinear")
    x_all, y_all = images.to(torch.float32), labels.to(torch.int64)
    n, bs = x_all.shape[0], recipe.batch_size
    if n < bs:
        raise ValueError(f"{n} training images for batches of {bs}")

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    losses: list[float] = []
    table.requires_grad_(False)
    model.train()
    # One thread: the backward of the embedding-row gathers accumulates in a thread-dependent order, and the cached
    # weights must not depend on the machine's thread count (about as fast: the model is tiny).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.AdamW(_param_groups(model, recipe, rows), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
        order, pos = torch.randperm(n, generator=gen), 0
        for step in range(recipe.steps if steps is None else steps):
            if pos + bs > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + bs]
            pos += bs
            x, y = augment(x_all[idx], gen), y_all[idx]
            low = torch.rand(bs, generator=gen) < recipe.lowres_prob
            x = torch.where(low[:, None, None, None], _lowres(x), x)
            caption = captions_of[y, torch.randint(captions_of.shape[1], (bs,), generator=gen)]  # one per image
            for group in opt.param_groups:
                group["lr"] = lr_at(step) * group["lr_mult"]
            uniq, inverse = torch.unique(caption, return_inverse=True)  # encode each distinct caption once
            img_raw = model.encode_image(_normalise(x))
            txt_raw = _encode_text(model, tokens[uniq], rows[remap[uniq]])[inverse]
            # Batch-centred embeddings (a random tower's embeddings share one dominant direction, from which
            # InfoNCE collapses); the means are folded into the model at the end (_fold_means).
            img = F.normalize(img_raw - img_raw.mean(0), dim=-1)
            txt = F.normalize(txt_raw - txt_raw.mean(0), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.t()
            same = (y[:, None] == y[None, :]).to(logits.dtype)
            target = same / same.sum(1, keepdim=True)  # every pair of the same digit is a positive
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(100.0))
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
        with torch.no_grad():
            table[used] = rows.detach()
        table.requires_grad_(True)
        model.eval()
    _fold_means(model, images, tokens)
    return losses


def _build(recipe: DigitsPretraining, model_name: str) -> dict[str, Tensor]:
    from fedlt.data.sources import EmbeddedDigits

    data = EmbeddedDigits(image_size=32, train_per_class=recipe.train_per_class).load()  # training images only
    model = _new_model(model_name, recipe.seed)
    train_digits_clip(model, data.train_x, data.train_y, recipe, _tokenizer(model_name))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def digits_checkpoint(model_name: str = TINY_CLIP, recipe: DigitsPretraining | None = None,
                      root: str | Path | None = None) -> Path:
    """The cached ``fedlt-digits`` checkpoint file of ``model_name``, trained (once, about 30 s) when missing."""
    from fedlt.data.sources import read_cache, write_cache

    recipe = recipe or DigitsPretraining()
    path = digits_checkpoint_path(recipe, root, model_name)
    if path.exists() and read_cache(path) is not None:
        return path
    print(f"building the tiny CLIP's digits pretraining (once, ~30 s), cache: {path}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    state = _build(recipe, model_name)
    write_cache(path, state)
    global last_build_s
    last_build_s = time.perf_counter() - start
    return path


@torch.no_grad()
def digits_zero_shot_accuracy(model: OpenClipModel, images: Tensor, labels: Tensor, model_name: str = TINY_CLIP,
                              template: str = 'a photo of the number: "{}".') -> float:
    """Zero-shot top-1 accuracy of an open_clip model on digit images (uint8 (N, 1, 32, 32)), names "0".."9"."""
    tokenizer = _tokenizer(model_name)
    model.eval()
    txt = F.normalize(model.encode_text(tokenizer([template.format(d) for d in range(10)])), dim=-1)
    correct = 0
    for i in range(0, images.shape[0], 512):
        x = _normalise(images[i : i + 512].to(torch.float32))
        img = F.normalize(model.encode_image(x), dim=-1)
        correct += int(((img @ txt.t()).argmax(1) == labels[i : i + 512]).sum())
    return correct / images.shape[0]
