"""CLIP baselines (zero-shot CLIP, PromptFL, PromptFolio, CLIP2FL, FedAvg / Fed-GraB on CLIP features) on the tiny
random-weight CLIP: values by hand, what is uploaded and stored, and what the server changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_data, tiny_sim

from fedlt.engine.simulator import Simulator
from fedlt.methods import FedAvg
from fedlt.methods._clip_kd import build_clip_teacher, clip_kd_loss, teacher_logits, to_clip_input
from fedlt.methods.clip2fl import CLIP2FL, prototype_contrastive_loss
from fedlt.methods.creff import CReFF
from fedlt.methods.fedgrab import FedGraB
from fedlt.methods.promptfl import PromptFL
from fedlt.methods.promptfolio import PromptFolio
from fedlt.methods.zeroshot_clip import ZeroShotCLIP
from fedlt.models import build_model
from fedlt.models.clip import CLIP_MEAN, CLIP_STD

TINY = "clip:fedlt-tiny-clip"
CREFF_SMALL = {"num_of_feature": 6, "match_epoch": 4, "crt_epoch": 3, "real_repeats": 2, "batch_real": 8}
TEACHER = {"clip_model": "fedlt-tiny-clip", "clip_pretrained": False}


def clip_sim(method, rounds: int = 2, clients_per_round: int = 3, seed: int = 0, **model_kwargs) -> Simulator:
    """A set-up simulator with the tiny CLIP (prompt PEFT unless told) on the tiny digits."""
    data = tiny_data(seed=seed)
    data.setup("cpu")
    torch.manual_seed(seed)
    net = build_model(TINY, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size,
                      class_names=list(data.class_names), dataset=data.source_name,
                      **{"peft": "prompt", **model_kwargs})
    return Simulator(None, data, net, method, rounds=rounds, clients_per_round=clients_per_round, seed=seed,
                     eval_every=1, client_state="memory").setup()


def _batch(sim: Simulator, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    return sim.data.get_batch(sim.data.test, torch.arange(n), None, train=False)


def manual_round(sim: Simulator, round: int, clients: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Runs one round client by client; returns each client's uploaded tensors (cloned right after its fit)."""
    message = sim.reducer.broadcast(round)
    sim.reducer.begin_round(round)
    sim.model.train()
    uploads = {}
    for cid in clients:
        sim.train_client(cid, message)
        uploads[cid] = {k: v.detach().clone() for k, v in sim.method.shared_tensors.items()}
    sim.reducer.reduce(None)
    sim.reducer.server_step(round)
    sim.round = round
    return uploads


# -- zero-shot CLIP ---------------------------------------------------------------------------------------------------
def test_zeroshot_gm_and_pm_are_the_hand_computed_zero_shot_accuracy_and_nothing_trains():
    sim = clip_sim(ZeroShotCLIP(), peft="none", clients_per_round=2)
    assert sim.global_state == {}  # peft none + text head: nothing to share at all
    (metrics,) = run(sim, 1)
    assert "train/loss" not in metrics  # no step ran
    out = sim.evaluate()
    data, model = sim.data, sim.model
    model.eval()
    with torch.no_grad():
        x, y = data.get_batch(data.test, torch.arange(len(data.test)), None, train=False)
        pred = model.zero_shot_logits(x).argmax(1)
    assert out["test/global/acc"] == pytest.approx(float((pred == y).float().mean()), abs=1e-6)
    per_client = [float((pred[i] == y[i]).float().mean()) for i in data.client_test_indices if i.numel()]
    assert out["test/personal/acc_mean"] == pytest.approx(sum(per_client) / len(per_client), abs=1e-6)


def test_zeroshot_uploads_nothing_and_ignores_the_peft_branch():
    sim = clip_sim(ZeroShotCLIP(), clients_per_round=2)
    before = global_copy(sim)
    assert sim.method.configure_optimizers() == []
    run(sim, 2)
    assert all(torch.equal(before[k], v) for k, v in sim.global_state.items())
    x, _ = _batch(sim)
    with torch.no_grad():
        sim.model.peft["global"].ctx.add_(1.0)  # a PEFT branch has no influence on zero-shot predictions
        torch.testing.assert_close(sim.method.predict_global(x), sim.model.zero_shot_logits(x))
        assert not torch.allclose(sim.model(x), sim.model.zero_shot_logits(x))


def test_clip_methods_refuse_a_non_clip_model():
    for method in (ZeroShotCLIP(), PromptFL(), PromptFolio()):
        with pytest.raises(ValueError, match="clip:"):
            tiny_sim(method)


# -- PromptFL ---------------------------------------------------------------------------------------------------------
def test_promptfl_uploads_only_the_prompt_and_averages_it_by_sample_count():
    sim = clip_sim(PromptFL(lr=0.01, batch_size=16), clients_per_round=3)
    assert list(sim.method.shared_tensors) == ["peft.global.ctx"]
    assert sim.method.personal_keys == ()
    start = sim.global_state["peft.global.ctx"].clone()
    clients = [0, 3, 5]
    uploads = manual_round(sim, 1, clients)
    sizes = torch.tensor([float(sim.data.client_indices[c].numel()) for c in clients])
    ctxs = torch.stack([uploads[c]["peft.global.ctx"] for c in clients])
    assert not torch.allclose(ctxs[0], ctxs[1]) and not torch.allclose(ctxs[0], start)
    expected = (sizes.view(-1, 1, 1) * ctxs).sum(0) / sizes.sum()
    torch.testing.assert_close(sim.global_state["peft.global.ctx"], expected, rtol=1e-5, atol=1e-7)
    assert not any(sim.store.get(c) for c in clients)  # nothing kept per client


def test_promptfl_accepts_lora_as_federated_peft_and_refuses_nothing_to_train():
    sim = clip_sim(PromptFL(lr=0.01, batch_size=16), rounds=1, clients_per_round=2, peft="lora")
    assert sim.method.shared_tensors and all(k.startswith("peft.global.lora.") for k in sim.method.shared_tensors)
    before = global_copy(sim)
    run(sim, 1)
    assert any(not torch.equal(before[k], v) for k, v in sim.global_state.items())
    with pytest.raises(ValueError, match="peft"):
        clip_sim(PromptFL(), peft="none")
    with pytest.raises(ValueError, match="head"):
        clip_sim(PromptFL(), peft="prompt", head="linear")


# -- PromptFolio ------------------------------------------------------------------------------------------------------
def test_promptfolio_pm_is_the_mixed_text_feature_classifier_and_gm_the_global_prompt():
    theta = 0.3
    sim = clip_sim(PromptFolio(theta=theta, lr=0.01, batch_size=16), rounds=1)
    run(sim, 1)
    model = sim.model
    cid = next(c for c in range(sim.data.num_clients) if sim.store.get(c))
    sim.load_client(cid)
    model.eval()
    x, _ = _batch(sim)
    with torch.no_grad():
        ctx_g, ctx_l = model.peft["global"].ctx, model.peft["local"].ctx
        assert not torch.allclose(ctx_g, ctx_l)
        f = F.normalize(model.clip.encode_image(model._prepare_input(x)), dim=-1)
        t_g = F.normalize(model.prompt_text_features(ctx_g), dim=-1)
        t_l = F.normalize(model.prompt_text_features(ctx_l), dim=-1)
        scale = model.clip.logit_scale.exp()
        expected_pm = scale * f @ ((1 - theta) * t_g + theta * t_l).t()  # normalise each, mix, no re-normalisation
        torch.testing.assert_close(sim.method.predict_personal(x, cid), expected_pm, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sim.method.predict_global(x), scale * f @ t_g.t(), rtol=1e-4, atol=1e-5)
        gm = sim.method.predict_global(x)
        model.peft["local"].ctx.add_(0.5)  # GM does not depend on any local prompt
        torch.testing.assert_close(sim.method.predict_global(x), gm)


def test_promptfolio_theta_zero_pm_equals_gm():
    sim = clip_sim(PromptFolio(theta=0.0, lr=0.01, batch_size=16), rounds=1)
    run(sim, 1)
    sim.model.eval()
    x, _ = _batch(sim)
    for cid in range(sim.data.num_clients):
        sim.load_client(cid)
        with torch.no_grad():
            torch.testing.assert_close(sim.method.predict_personal(x, cid), sim.method.predict_global(x))


def test_promptfolio_local_prompt_stays_per_client_and_only_the_global_prompt_is_averaged():
    sim = clip_sim(PromptFolio(lr=0.01, batch_size=16), clients_per_round=3)
    method = sim.method
    assert list(method.shared_tensors) == ["peft.global.ctx"]
    assert method.personal_keys == ("peft.local.ctx",)
    assert method.personalizes
    init_local = sim._default_personal["peft.local.ctx"].clone()
    clients = [1, 2, 4]
    uploads = manual_round(sim, 1, clients)
    assert all(list(u) == ["peft.global.ctx"] for u in uploads.values())  # the local prompt is never uploaded
    sizes = torch.tensor([float(sim.data.client_indices[c].numel()) for c in clients])
    ctxs = torch.stack([uploads[c]["peft.global.ctx"] for c in clients])
    torch.testing.assert_close(sim.global_state["peft.global.ctx"],
                               (sizes.view(-1, 1, 1) * ctxs).sum(0) / sizes.sum(), rtol=1e-5, atol=1e-7)
    stored = {c: sim.store.get(c) for c in clients}
    for c in clients:
        assert set(stored[c]) == {"model.peft.local.ctx"}  # no backbone tensor, no global prompt in the store
        assert not torch.allclose(stored[c]["model.peft.local.ctx"], init_local)
    assert not torch.allclose(stored[1]["model.peft.local.ctx"], stored[2]["model.peft.local.ctx"])
    assert not sim.store.get(0)  # an untrained client keeps the initial local prompt
    sim.load_client(0)
    assert torch.equal(sim.model.peft["local"].ctx, init_local)
    sim.load_client(2)  # a trained client gets its own local prompt back next to the new global one
    assert torch.equal(sim.model.peft["local"].ctx, stored[2]["model.peft.local.ctx"])
    assert torch.equal(sim.model.peft["global"].ctx, sim.global_state["peft.global.ctx"])
    ckpt = sim.state_dict()
    assert not any(k.startswith("model.clip.") or "clip." in k for s in ckpt["store"]["states"].values() for k in s)


def test_promptfolio_needs_prompt_peft():
    with pytest.raises(ValueError, match="prompt"):
        clip_sim(PromptFolio(), peft="adapter")


# -- CLIP2FL ----------------------------------------------------------------------------------------------------------
def test_kd_loss_is_zero_for_equal_logits_and_the_scaled_kl_otherwise():
    s = torch.randn(5, 7)
    assert clip_kd_loss(s, s.clone(), 3.0).abs().item() < 1e-6
    assert clip_kd_loss(s, s + 2.0, 3.0).abs().item() < 1e-6  # a per-row shift does not change the softmax
    t = torch.randn(5, 7)
    q, log_p = F.softmax(t / 3, 1), F.log_softmax(s / 3, 1)
    expected = 9.0 * (q * (q.log() - log_p)).sum(1).mean()
    assert clip_kd_loss(s, t, 3.0).item() == pytest.approx(expected.item(), rel=1e-5)
    s.requires_grad_(True)
    t.requires_grad_(True)
    clip_kd_loss(s, t, 3.0).backward()
    assert s.grad is not None and t.grad is None  # the teacher is detached


def _supcon_text_reference(features, labels, text, temperature):
    """Literal transcription of the official ``SupConLoss_text`` (N x N, text repeated per feature)."""
    n = features.shape[0]
    lab = labels.view(-1, 1)
    mask = torch.eq(lab, lab.T).float()
    logits = features @ text.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    logits_mask = torch.ones_like(mask).scatter(1, torch.arange(n).view(-1, 1), 0)
    mask = mask * logits_mask
    single = (mask.sum(1) == 0).float()
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_pos = (mask * log_prob).sum(1) / (mask.sum(1) + single)
    loss = -mean_pos * (1 - single)
    return loss.sum() / (n - single.sum())


def test_prototype_contrastive_loss_equals_the_official_supcon_text_loss():
    c, m, d = 4, 3, 6
    feats = torch.randn(c * m, d, requires_grad=True)
    labels = torch.arange(c).repeat_interleave(m)
    protos = F.normalize(torch.randn(c, d), dim=-1)
    ours = prototype_contrastive_loss(feats, labels, protos, 0.1)
    ref = _supcon_text_reference(feats, labels, protos[labels], 0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    (g1,) = torch.autograd.grad(ours, feats)
    (g2,) = torch.autograd.grad(_supcon_text_reference(feats, labels, protos[labels], 0.1), feats)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    one_each = prototype_contrastive_loss(feats[::m], labels[::m], protos, 0.1)  # no positives at all: 0
    assert one_each.item() == 0.0
    # Features on their own prototypes score lower than features on another class's prototype.
    assert prototype_contrastive_loss(5 * protos[labels], labels, protos, 0.1) < \
        prototype_contrastive_loss(5 * protos[(labels + 1) % c], labels, protos, 0.1)


def test_teacher_input_is_renormalised_to_clip_statistics():
    raw = torch.rand(2, 1, 8, 8)
    stats = ((0.3,), (0.2,))
    x = (raw - 0.3) / 0.2
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(to_clip_input(x, stats), (raw.expand(-1, 3, -1, -1) - mean) / std)
    assert to_clip_input(x, None) is x


def test_clip2fl_reduces_to_creff_without_kd_and_contrast_and_the_contrast_changes_only_the_eval_classifier():
    creff = tiny_sim(CReFF(lr=0.05, batch_size=16, **CREFF_SMALL), rounds=2)
    plain = tiny_sim(CLIP2FL(kd_weight=0.0, contrast_weight=0.0, lr=0.05, batch_size=16, **CREFF_SMALL, **TEACHER),
                     rounds=2)
    contrast = tiny_sim(CLIP2FL(kd_weight=0.0, contrast_weight=1.0, lr=0.05, batch_size=16, **CREFF_SMALL, **TEACHER),
                        rounds=2)
    run(creff), run(plain), run(contrast)
    for k, v in creff.global_state.items():
        assert torch.equal(plain.global_state[k], v), k
        assert torch.equal(contrast.global_state[k], v), k  # the server term never touches the FedAvg model
    for attr in ("features", "head_w", "head_b"):
        assert torch.equal(getattr(plain.reducer, attr), getattr(creff.reducer, attr)), attr
    assert not torch.allclose(contrast.reducer.features, creff.reducer.features)
    assert not torch.allclose(contrast.reducer.head_w, creff.reducer.head_w)
    contrast.evaluator._load_global()
    contrast.model.eval()
    x, _ = _batch(contrast, 20)
    with torch.no_grad():
        expected = F.linear(contrast.model.forward_features(x), contrast.reducer.head_w, contrast.reducer.head_b)
        torch.testing.assert_close(contrast.method.predict_global(x), expected)


def test_clip2fl_feature_objective_is_matching_with_the_bias_row_plus_the_weighted_contrast():
    """Paper Eq. 8 / code ``update_feature_syn``: per owned class the official ``match_loss`` (weight rows + the
    bias gradient as one row) plus ``contrast_weight`` (default 0.001, the code's ``--contrast_alpha``) x L_PCL."""
    sim = tiny_sim(CLIP2FL(**CREFF_SMALL, **TEACHER), rounds=1)
    m, red = sim.method, sim.reducer
    assert m.contrast_weight == 0.001
    c, d = red.num_classes, red.dim
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(c * m.num_of_feature, d, generator=gen)
    real_w, real_b = torch.randn(c, c, d, generator=gen), torch.randn(c, c, generator=gen)
    owned = torch.arange(c) % 3 != 0
    ref = 0.0
    for k in range(c):
        if not owned[k]:
            continue
        f = feats[k * m.num_of_feature:(k + 1) * m.num_of_feature].clone().requires_grad_(True)
        w, b = red.head_w.clone().requires_grad_(True), red.head_b.clone().requires_grad_(True)
        ce = F.cross_entropy(F.linear(f, w, b), torch.full((m.num_of_feature,), k))
        gw, gb = torch.autograd.grad(ce, (w, b))
        for syn, real in ((gw, real_w[k]), (gb.view(1, -1), real_b[k].view(1, -1))):
            cos = (syn * real).sum(-1) / (syn.norm(dim=-1) * real.norm(dim=-1) + 1e-6)
            ref += (1 - cos).sum().item()
    protos = m.text_prototypes
    ref += 0.001 * prototype_contrastive_loss(feats, red.labels, protos, m.contrast_temperature).item()
    assert red.feature_objective(feats, real_w, real_b, owned).item() == pytest.approx(ref, rel=1e-5)


def test_clip2fl_kd_changes_training_and_the_teacher_stays_out_of_every_state():
    creff = tiny_sim(CReFF(lr=0.05, batch_size=16, **CREFF_SMALL), rounds=1)
    sim = tiny_sim(CLIP2FL(lr=0.05, batch_size=16, **CREFF_SMALL, **TEACHER), rounds=1)
    (metrics,) = run(sim, 1)
    run(creff, 1)
    assert metrics["train/loss_kd"] > 0
    assert metrics["train/loss"] == pytest.approx(metrics["train/loss_ce"] + metrics["train/loss_kd"], rel=1e-5)
    assert set(sim.global_state) == set(creff.global_state) == set(sim.model.state_dict())
    assert any(not torch.equal(sim.global_state[k], v) for k, v in creff.global_state.items())
    teacher = sim.method.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher not in list(sim.model.modules())
    ckpt = sim.state_dict()
    flat = [v for v in ckpt["reducer"]["global"].values()] + [v for v in ckpt["reducer"]["creff"].values()]
    assert sum(t.numel() for t in flat) == sum(t.numel() for t in creff.state_dict()["reducer"]["global"].values()) \
        + sum(t.numel() for t in creff.state_dict()["reducer"]["creff"].values())
    assert ckpt["method"] == {} and not ckpt["store"].get("states")


def test_clip2fl_teacher_logits_and_text_prototypes():
    sim = tiny_sim(CLIP2FL(**CREFF_SMALL, **TEACHER), rounds=1)
    m = sim.method
    assert m.dim == m.teacher.num_features  # cnn hidden 32 = tiny CLIP's 32-d embedding: no projection
    assert torch.equal(m.text_prototypes, m.teacher.zs_text)
    assert m.teacher.templates == ("a photo of a {}",)
    x, _ = _batch(sim, 8)
    z = teacher_logits(m.teacher, x, m.norm_stats, 100.0)
    f = m.teacher.encode(to_clip_input(x, m.norm_stats), None)
    torch.testing.assert_close(z, 100.0 * f @ m.teacher.zs_text.t())
    assert z.abs().max() <= 100.0 + 1e-4  # 100 x cosine
    # Same teacher on every build (fixed seed for random weights), whatever the global RNG did before.
    torch.manual_seed(123)
    other = build_clip_teacher(sim.data.class_names, sim.data.source_name, "fedlt-tiny-clip", False, None, None,
                               templates=("a photo of a {}",))
    torch.testing.assert_close(other.zs_text, m.teacher.zs_text)


def test_clip2fl_projects_text_prototypes_to_another_feature_dimension():
    sim = tiny_sim(CLIP2FL(**CREFF_SMALL, **TEACHER), model="resnet8", rounds=1)
    protos = sim.method.text_prototypes
    assert protos.shape == (sim.data.num_classes, sim.model.num_features) != tuple(sim.method.teacher.zs_text.shape)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(protos.shape[0]))
    with pytest.raises(ValueError, match="text_projection"):
        tiny_sim(CLIP2FL(text_projection="error", **CREFF_SMALL, **TEACHER), model="resnet8", rounds=1)


# -- FedAvg / Fed-GraB on CLIP features (linear probe) -----------------------------------------------------------------
@pytest.mark.parametrize("method", [FedAvg(lr=0.05, batch_size=16), FedGraB(lr=0.05, batch_size=16)],
                         ids=["fedavg", "fedgrab"])
def test_linear_probe_on_clip_features_shares_only_the_head(method):
    sim = clip_sim(method, peft="none", head="linear")
    assert set(sim.global_state) == {"head.weight", "head.bias"}
    x, _ = _batch(sim)
    with torch.no_grad():  # the head starts as the zero-shot classifier
        sim.model.eval()
        torch.testing.assert_close(sim.method.predict_global(x), sim.model.zero_shot_logits(x), rtol=1e-4, atol=1e-4)
    before = global_copy(sim)
    for metrics in run(sim, 2):
        assert metrics["train/loss"] > 0 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert all(not torch.equal(before[k], v) for k, v in sim.global_state.items())
    assert 0.0 <= sim.evaluate()["test/global/acc"] <= 1.0
