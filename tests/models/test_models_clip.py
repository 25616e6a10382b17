"""CLIP models with PEFT branches (fedlt/models/clip.py) on the tiny random open_clip configuration."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from fedlt.engine.params import model_tensors
from fedlt.models import build_model
from fedlt.models.clip import ClipModel, ClipWeightsUnavailable, _PeftBranch, create_open_clip
from fedlt.registry import UnknownNameError

NAMES = ["zero", "one", "two", "three", "four"]


def _tiny(peft: str = "prompt", seed: int = 0, **kwargs) -> ClipModel:
    torch.manual_seed(seed)
    return build_model("clip:fedlt-tiny-clip", len(NAMES), class_names=NAMES, dataset="cifar100", peft=peft,
                       **kwargs)


@pytest.fixture(scope="module")
def prompt_model() -> ClipModel:
    return _tiny("prompt").eval()


def test_only_peft_tensors_are_trainable_and_shared(prompt_model: ClipModel) -> None:
    m = prompt_model
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"peft.global.ctx"}
    assert m.peft["global"].ctx.shape == (4, m.text_width)
    shared = model_tensors(m)
    assert set(shared) == {"peft.global.ctx"}  # the engine never sees the backbone
    frozen = set(m.frozen_state_keys())
    assert frozen and all(k.startswith("clip.") for k in frozen)
    assert frozen | set(shared) == set(m.state_dict())


def test_prompt_with_template_context_equals_clip_text_encoder() -> None:
    """CoOp's prompt path with the context initialised from "a photo of a" reproduces CLIP's own text encoding of
    "a photo of a {name}." exactly (same tokens, same transformer, EOT pooling, projection)."""
    m = _tiny("prompt", ctx_init="a photo of a").eval()
    assert m.peft["global"].ctx.shape[0] == 4
    with torch.no_grad():
        ours = m.text_features("global")
        tokens = m.tokenizer([f"a photo of a {n}." for n in NAMES])
        ref = F.normalize(m.clip.encode_text(tokens), dim=-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # The zero-shot classifier uses the dataset template (cifar100: "a photo of a {}.") so it is the same here.
    torch.testing.assert_close(m.zs_text, ref, rtol=1e-5, atol=1e-5)


def test_logits_are_scaled_cosines_and_zero_shot_ignores_branches(prompt_model: ClipModel) -> None:
    m = prompt_model
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = F.normalize(m.clip.encode_image(x), dim=-1)
        expected = m.clip.logit_scale.exp() * f @ m.text_features("global").t()
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
        zs = m.clip.logit_scale.exp() * f @ m.zs_text.t()
        torch.testing.assert_close(m.zero_shot_logits(x), zs, rtol=1e-5, atol=1e-5)
        with m.use_branch(None):
            torch.testing.assert_close(m(x), zs, rtol=1e-5, atol=1e-5)


def test_inputs_are_resized_and_grey_repeated(prompt_model: ClipModel) -> None:
    grey = torch.rand(2, 1, 16, 16)
    rgb = F.interpolate(grey.expand(-1, 3, -1, -1), size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(prompt_model(grey), prompt_model(rgb))


def test_branches_are_independent_and_personal_branch_changes_logits() -> None:
    m = _tiny("prompt").eval()
    m.add_branch("personal")
    assert set(model_tensors(m)) == {"peft.global.ctx", "peft.personal.ctx"}
    assert not torch.equal(m.peft["global"].ctx, m.peft["personal"].ctx)  # independent initialisations
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        g = m(x)
        with m.use_branch("personal"):
            p = m(x)
        assert not torch.allclose(g, p)
        torch.testing.assert_close(m(x), g)  # the context manager restored the global branch
    with pytest.raises(ValueError, match="exists"):
        m.add_branch("personal")
    with pytest.raises(KeyError, match="branches"):
        with m.use_branch("nope"):
            pass


def test_gradients_reach_only_the_active_branch() -> None:
    m = _tiny("prompt")
    m.add_branch("personal")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with m.use_branch("personal"):
        F.cross_entropy(m(x), y).backward()
    assert m.peft["global"].ctx.grad is None
    assert m.peft["personal"].ctx.grad is not None and m.peft["personal"].ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.clip.parameters())


def test_text_feature_cache_follows_in_place_updates(prompt_model: ClipModel) -> None:
    m = _tiny("prompt").eval()
    with torch.no_grad():
        before = m.text_features("global").clone()
        m.peft["global"].ctx.add_(0.5)  # e.g. the engine copy_-ing a new global prompt in
        after = m.text_features("global")
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, m.prompt_text_features(m.peft["global"].ctx))


@pytest.mark.parametrize(("scaling", "scale"), [("alpha_over_r", 4.0 / 2), ("alpha_over_sqrt_r", 4.0 / math.sqrt(2))])
def test_fresh_lora_equals_zero_shot_and_matches_merged_weights(scaling: str, scale: float) -> None:
    m = _tiny("lora", lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, lora_scaling=scaling).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.zero_shot_logits(x), rtol=1e-5, atol=1e-5)  # B = 0 at init
        lora = m.peft["global"].lora
        for k, v in lora.items():
            if k.endswith("_B"):
                v.normal_(0.0, 0.05)
        got = m.encode(x, "global")
        # Reference: merge W + s B A (s = alpha / r or alpha / sqrt(r)) into a copy of each attention layer and run
        # plain CLIP.
        ref = _tiny("none", lora_dropout=0.0).eval()
        ref.clip.load_state_dict({k.replace(".attn.base.", ".attn."): v for k, v in m.clip.state_dict().items()})
        for i, block in enumerate(ref.clip.visual.transformer.resblocks):
            w = block.attn.in_proj_weight
            d = w.shape[1]
            for j, t in enumerate("qkv"):
                delta = lora[f"l{i}_{t}_B"] @ lora[f"l{i}_{t}_A"] * scale
                w[j * d : (j + 1) * d] += delta
        want = F.normalize(ref.clip.encode_image(x), dim=-1)
    assert not torch.allclose(got, m.encode(x, None))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _hand_lora_attention(base: torch.nn.MultiheadAttention, lora, layer: int, scale: float,
                         x: torch.Tensor) -> torch.Tensor:
    """One self-attention layer with LoRA deltas written out: q/k/v = x W^T + b + s (x A^T) B^T, per-head softmax
    attention, output projection. ``x`` is (B, N, d); returns (B, N, d)."""
    b, n, d = x.shape
    h = base.num_heads
    parts = []
    for j, t in enumerate("qkv"):
        w, bias = base.in_proj_weight[j * d : (j + 1) * d], base.in_proj_bias[j * d : (j + 1) * d]
        parts.append(x @ w.t() + bias + scale * (x @ lora[f"l{layer}_{t}_A"].t()) @ lora[f"l{layer}_{t}_B"].t())
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in parts)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    out = (att @ v).transpose(1, 2).reshape(b, n, d)
    return out @ base.out_proj.weight.t() + base.out_proj.bias


def test_lora_scaling_rules_match_a_hand_written_lora_attention() -> None:
    """``alpha_over_r`` (LoRA's rule, default) scales the delta by alpha / r = 2 at r = 8, alpha = 16;
    ``alpha_over_sqrt_r`` (CLIP-LoRA's loralib, FedPuReL's code) by alpha / sqrt(r) = 5.66. Each mode equals a
    hand-written attention layer with its scale, and the two modes' outputs differ."""
    outs = {}
    for scaling, scale in (("alpha_over_r", 16 / 8), ("alpha_over_sqrt_r", 16 / math.sqrt(8))):
        m = _tiny("lora", lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_scaling=scaling).double().eval()
        assert m.lora_scale == pytest.approx(scale, rel=1e-12)
        lora = m.peft["global"].lora
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for k, v in lora.items():
                if k.endswith("_B"):
                    v.copy_(torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.05)
            attn = m.clip.visual.transformer.resblocks[0].attn
            x = torch.randn(2, 5, attn.base.embed_dim, generator=g, dtype=torch.float64)
            xin = x if attn.base.batch_first else x.transpose(0, 1)
            got = attn(xin, xin, xin, need_weights=False)[0]
            got = got if attn.base.batch_first else got.transpose(0, 1)
            want = _hand_lora_attention(attn.base, lora, 0, scale, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        outs[scaling] = got
    # The same factors, the two rules: the code's delta is sqrt(8) times larger, the outputs differ measurably.
    assert (outs["alpha_over_r"] - outs["alpha_over_sqrt_r"]).abs().max() > 1e-3


def test_lora_trains_only_its_factors_and_dropout_is_train_only() -> None:
    m = _tiny("lora", lora_rank=2, lora_targets=("q", "v"))
    keys = set(model_tensors(m))
    assert keys == {f"peft.global.lora.l{i}_{t}_{ab}" for i in range(2) for t in "qv" for ab in "AB"}
    for k, v in m.peft["global"].lora.items():
        if k.endswith("_B"):
            v.data.normal_(0.0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    F.cross_entropy(m(x), torch.tensor([0, 1])).backward()
    grads = {k: p.grad for k, p in m.peft["global"].lora.items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in m.clip.parameters())
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))  # no dropout at evaluation


def test_adapter_residual_ratio() -> None:
    m = _tiny("adapter", adapter_ratio=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x, "global"), m.encode(x, None))  # ratio 0: the adapter is off
        m.adapter_ratio = 0.2
        raw = m.clip.encode_image(x)
        a = m.peft["global"].adapter(raw)
        torch.testing.assert_close(m.encode(x, "global"), F.normalize(0.2 * a + 0.8 * raw, dim=-1))
    assert set(model_tensors(m)) == {"peft.global.adapter.0.weight", "peft.global.adapter.2.weight"}


def test_attention_adapter_is_fedclips_softmax_attention_on_the_image_feature() -> None:
    """FedCLIP's attention adapter (FedPuReL's code): f' = softmax(W2 tanh(W1 f + b1) + b2) * f, normalised."""
    m = _tiny("attention_adapter").eval()
    assert set(model_tensors(m)) == {f"peft.global.attn_adapter.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert m.image_depends_on_branch()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        raw = m.clip.encode_image(x)
        a = m.peft["global"].attn_adapter
        hidden = torch.tanh(raw @ a[0].weight.t() + a[0].bias)
        scores = torch.exp(hidden @ a[2].weight.t() + a[2].bias)
        f = scores / scores.sum(-1, keepdim=True) * raw
        want = f / f.norm(dim=-1, keepdim=True)
        got = m.encode(x, "global")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got - m.encode(x, None)).abs().max() > 1e-3  # not the zero-shot feature
    F.cross_entropy(m(x), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.peft["global"].parameters())
    assert all(p.grad is None for p in m.clip.parameters())


def test_adapter_parameter_counts_at_clip_vit_b_width() -> None:
    """At d = 512 (ViT-B/16): the attention adapter has two d x d layers with biases, 2 (512^2 + 512) = 525,312
    parameters (the code's FedCLIP adapter); CLIP-Adapter (reduction 4, no biases) 2 * 512 * 128 = 131,072."""
    common = dict(text_width=512, embed_dim=512, vision_layers=0, vision_width=0, n_ctx=4, ctx_init=None,
                  lora_rank=8, lora_targets=("q", "k", "v"), adapter_reduction=4)
    count = {kind: sum(p.numel() for p in _PeftBranch(kind, **common).parameters())
             for kind in ("attention_adapter", "adapter")}
    assert count == {"attention_adapter": 525_312, "adapter": 131_072}


def _encoded(m: ClipModel, template: str) -> torch.Tensor:
    return F.normalize(m.clip.encode_text(m.tokenizer([template.format(n) for n in NAMES])), dim=-1)


@pytest.mark.parametrize(("dataset", "coop", "code"), [
    ("oxford_pets", "a photo of a {}, a type of pet.", "a type of pet, a photo of a {}."),
    ("food101", "a photo of {}, a type of food.", "a type of food, a photo of {}."),
    ("dtd", "a photo of a {} pattern.", "a texture of {}."),
])
def test_template_sets_select_coops_or_fedpurel_codes_table(dataset: str, coop: str, code: str) -> None:
    models = {}
    for template_set in ("coop", "fedpurel_code"):
        torch.manual_seed(0)
        models[template_set] = build_model("clip:fedlt-tiny-clip", len(NAMES), class_names=NAMES, dataset=dataset,
                                           peft="none", template_set=template_set).eval()
    assert models["coop"].templates == (coop,) and models["fedpurel_code"].templates == (code,)
    with torch.no_grad():
        torch.testing.assert_close(models["fedpurel_code"].zs_text, _encoded(models["fedpurel_code"], code),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(models["coop"].zs_text, _encoded(models["coop"], coop), rtol=1e-5, atol=1e-6)
    assert (models["coop"].zs_text - models["fedpurel_code"].zs_text).abs().max() > 1e-3
    # The table only applies without explicit templates; datasets the tables agree on are unchanged.
    explicit = build_model("clip:fedlt-tiny-clip", len(NAMES), class_names=NAMES, dataset=dataset, peft="none",
                           template_set="fedpurel_code", templates=["a drawing of a {}."])
    assert explicit.templates == ("a drawing of a {}.",)
    cifar = build_model("clip:fedlt-tiny-clip", len(NAMES), class_names=NAMES, dataset="cifar100", peft="none",
                        template_set="fedpurel_code")
    assert cifar.templates == ("a photo of a {}.",)


def test_linear_head_starts_at_zero_shot() -> None:
    m = _tiny("none", head="linear").eval()
    assert set(model_tensors(m)) == {"head.weight", "head.bias"}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.zero_shot_logits(x), rtol=1e-5, atol=1e-5)
    r = _tiny("none", head="linear", head_init="random").eval()
    with torch.no_grad():
        assert not torch.allclose(r(x), r.zero_shot_logits(x))


def test_templates_are_ensembled() -> None:
    m = _tiny("none", templates=["a photo of a {}.", "a drawing of a {}."]).eval()
    with torch.no_grad():
        feats = [F.normalize(m.clip.encode_text(m.tokenizer([t.format(n) for n in NAMES])), dim=-1)
                 for t in ("a photo of a {}.", "a drawing of a {}.")]
        torch.testing.assert_close(m.zs_text, F.normalize((feats[0] + feats[1]) / 2, dim=-1))


def test_deterministic_given_the_seed() -> None:
    a, b, c = _tiny("lora", seed=3), _tiny("lora", seed=3), _tiny("lora", seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"peft": "bitfit"}, "unknown peft"),
    ({"head": "mlp"}, "unknown head"),
    ({"lora_targets": ("q", "o")}, "lora_targets"),
    ({"templates": ["no placeholder"]}, "exactly one"),
    ({"lora_scaling": "alpha"}, "unknown lora_scaling"),
    ({"template_set": "paper"}, "unknown template_set"),
    ({"class_names": ["a", "b"]}, "2 class names for 5 classes"),
])
def test_bad_arguments(kwargs, match) -> None:
    kwargs = {"class_names": NAMES, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model("clip:fedlt-tiny-clip", len(NAMES), dataset="cifar100", **kwargs)


def test_unknown_model_and_tag() -> None:
    with pytest.raises(UnknownNameError, match="unknown open_clip model"):
        build_model("clip:ViT-Q-99", 3)
    with pytest.raises(UnknownNameError, match="valid tags: .*openai"):
        create_open_clip("ViT-B-16", pretrained=True, tag="not-a-tag")


def test_missing_weights_fail_fast_offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t0 = time.perf_counter()
    with pytest.raises(ClipWeightsUnavailable, match="checkpoint_path"):
        create_open_clip("RN50", pretrained=True, tag="openai")
    assert time.perf_counter() - t0 < 60
    with pytest.raises(ClipWeightsUnavailable, match="no such file"):
        create_open_clip("RN50", checkpoint_path=os.fspath(tmp_path / "missing.pt"))


def test_local_checkpoint_is_loaded(tmp_path) -> None:
    torch.manual_seed(5)
    src = create_open_clip("fedlt-tiny-clip")
    path = tmp_path / "tiny.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(6)
    m = build_model("clip:fedlt-tiny-clip", len(NAMES), class_names=NAMES, checkpoint_path=str(path), peft="none")
    for k, v in src.state_dict().items():
        assert torch.equal(m.clip.state_dict()[k], v), k
