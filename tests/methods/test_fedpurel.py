"""FedPuReL invariants (docs/reference.md 4.9): gradient purification, temperature-aligned KL, Stage 2, uploads, store,
cohorts, inference -- plus a hand-written Stage-1 step, every PEFT kind (prompt, LoRA, CLIP-Adapter, FedCLIP's
attention adapter) and the released code's options (soft cross-entropy alignment of the code's adapter variant)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq

from fedlt.cli import build, make_experiment
from fedlt.engine.sharding import sample_cohort
from fedlt.methods._tkl import aligned_temperatures, plain_kl, soft_cross_entropy, softmax_entropy, tkl
from fedlt.methods.fedpurel import FedPuReL, purify
from fedlt.types import ClientContext

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config", str(ROOT / "tests" / "configs" / "tiny.yaml"),
        "--config", str(ROOT / "configs" / "method" / "fedpurel.yaml"),
        "--config", str(ROOT / "tests" / "configs" / "fast" / "fedpurel.yaml"),
        "--method.init_args.batch_size", "16",
        # Smaller than tiny.yaml (seconds per file): about 190 training and 80 test images.
        "--data.source.init_args.train_per_class", "50", "--data.source.init_args.test_per_class", "8"]
PEFTS = ("prompt", "lora", "adapter", "attention_adapter")


def _sim(tmp_path: Path, *extra: str, peft: str = "prompt", model_kwargs: str = ""):
    kwargs = f"{{peft: {peft}{', ' + model_kwargs if model_kwargs else ''}}}"
    parser, cfg, init = build("fit", [*ARGS, "--model.kwargs", kwargs, "--run_dir", str(tmp_path), *extra])
    return make_experiment(parser, cfg, init).build_simulator()


def _personal(sim) -> dict[int, dict[str, torch.Tensor]]:
    return {c: {k: v.clone() for k, v in s.items()} for c, s in sim.store.state_dict()["states"].items()}


def _ctx(sim, cid: int, round: int = 1) -> ClientContext:
    return ClientContext(client_id=cid, round=round, num_samples=sim._sizes[cid], class_counts=sim._class_counts[cid],
                         generator=torch.Generator().manual_seed(cid), device=sim.device,
                         message=sim.reducer.broadcast(round))


def _batch(sim, cid: int = 0, n: int = 16):
    idx = sim.data.client_indices[cid][:n]
    x, y = sim.data.get_batch(sim.data.train, idx, None)[:2]
    return x, y


# -- purification (4.9-1) ------------------------------------------------------------------------------------
def _grads(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5,), (3, 4), (2, 2, 3), (7,)]
    scale = 1.0 / math.sqrt(sum(math.prod(s) for s in shapes))  # unit-scale vectors (the atol is absolute)
    return ([torch.randn(s, generator=g) * scale for s in shapes],
            [torch.randn(s, generator=g) * scale for s in shapes])


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


@pytest.mark.parametrize("seed", range(6))
def test_per_tensor_purification(seed):
    g_task, g_align = _grads(seed)
    g_task[0] = -g_align[0] + 0.1 * g_task[0]  # one sure conflict
    g_task[3] = g_align[3].clone()  # one sure agreement
    out, conflict = purify(g_task, g_align, "per_tensor", 1.0)
    assert conflict.tolist() == [_dot(t, a) < 0 for t, a in zip(g_task, g_align)]
    assert conflict[0] and not conflict[3]
    for t, a, o in zip(g_task, g_align, out):
        before, after = _dot(t, a), _dot(o, a)
        assert after >= -1e-6
        if before < 0:
            assert abs(after) < 1e-6
            ref = t.double() - before / float(a.double().pow(2).sum()) * a.double()  # the paper's formula
            torch.testing.assert_close(o.double(), ref, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(o, t)
        assert float(o.norm()) <= float(t.norm()) + 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_global_purification(seed):
    g_task, g_align = _grads(seed)
    if seed % 2:  # force a global conflict on odd seeds, agreement on even ones
        g_task = [-a + 0.1 * t for t, a in zip(g_task, g_align)]
    else:
        g_task = [a + 0.1 * t for t, a in zip(g_task, g_align)]
    before = sum(_dot(t, a) for t, a in zip(g_task, g_align))
    out, conflict = purify(g_task, g_align, "global", 1.0)
    after = sum(_dot(o, a) for o, a in zip(out, g_align))
    assert conflict.tolist() == [before < 0]
    assert after >= -1e-6
    if before < 0:
        assert abs(after) < 1e-6
    else:
        assert all(torch.equal(o, t) for o, t in zip(out, g_task))
    norm = lambda gs: math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))  # noqa: E731
    assert norm(out) <= norm(g_task) + 1e-6


def test_lambda_proj_scales_the_projected_component():
    t, a = [torch.tensor([-1.0, 1.0])], [torch.tensor([1.0, 0.0])]
    half, _ = purify(t, a, "per_tensor", 0.5)
    assert torch.equal(half[0], torch.tensor([-0.5, 1.0]))
    full, _ = purify(t, a, "per_tensor", 1.0)
    assert torch.equal(full[0], torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("mode", ["per_tensor", "global"])
def test_noise_floor_leaves_a_negligible_alignment_gradient_unprojected(mode):
    g_task, g_align = _grads(3)
    tiny = [-1e-6 * t for t in g_task]  # a sure conflict, but 1e-6 of the task gradient's norm
    projected, conflict = purify(g_task, tiny, mode, 1.0)
    assert bool(conflict.all()) and not all(torch.equal(o, t) for o, t in zip(projected, g_task))
    kept, conflict = purify(g_task, tiny, mode, 1.0, noise_floor=1e-4)
    assert not bool(conflict.any()) and all(torch.equal(o, t) for o, t in zip(kept, g_task))
    # Above the floor the rule is unchanged: the same decisions and values as without a floor.
    big = [-0.5 * t + 0.1 * a for t, a in zip(g_task, g_align)]
    ref, c_ref = purify(g_task, big, mode, 1.0)
    out, c_out = purify(g_task, big, mode, 1.0, noise_floor=1e-4)
    assert torch.equal(c_ref, c_out) and bool(c_out.any())
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    with pytest.raises(ValueError, match="noise_floor"):
        purify(g_task, big, mode, 1.0, noise_floor=-1.0)


# -- TKL (4.9-2) ---------------------------------------------------------------------------------------------
def _logits(seed: int, n: int = 32, c: int = 10, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale


def test_aligned_entropies_equal_h_star_and_match_a_root_finder():
    f, z = _logits(0), _logits(1)
    tau_f, tau_z, h_star = aligned_temperatures(f, z)
    assert bool(((tau_f > 0.05) & (tau_f < 20) & (tau_z > 0.05) & (tau_z < 20)).all())  # roots inside the bracket
    assert float((softmax_entropy(f, tau_f) - h_star).abs().max()) < 1e-4
    assert float((softmax_entropy(z, tau_z) - h_star).abs().max()) < 1e-4
    ref_h = 0.5 * (softmax_entropy(f.double()) + softmax_entropy(z.double()))
    torch.testing.assert_close(h_star.double(), ref_h, atol=1e-5, rtol=0)
    for i in range(4):  # an independent root finder in float64
        def gap(t: float, row: torch.Tensor = f[i].double()[None], target: float = float(ref_h[i])) -> float:
            return float(softmax_entropy(row, t)[0]) - target

        assert abs(float(tau_f[i]) - brentq(gap, 0.05, 20.0, xtol=1e-10)) < 1e-4


def test_tkl_identities():
    z = _logits(2)
    assert float(tkl(z, z)) == 0.0
    for a in (0.3, 0.5, 2.0, 4.0):  # a confidence change is neutralised
        for d in ("teacher_first", "reverse"):
            assert abs(float(tkl(a * z, z, d))) < 1e-6, (a, d)
    for c in (-7.0, 3.5):
        for d in ("teacher_first", "reverse"):
            assert abs(float(tkl(z + c, z, d))) < 1e-6
    assert float(plain_kl(2 * z, z)) > 0.05 and abs(float(tkl(2 * z, z))) < 1e-6


def test_tkl_is_non_negative_and_zero_for_constant_logits():
    for seed in range(5):
        f, z = _logits(10 + seed, scale=1.0 + seed), _logits(20 + seed)
        for d in ("teacher_first", "reverse"):
            assert float(tkl(f, z, d)) >= -1e-7
        assert float(tkl(f, z)) > 1e-3
    f = torch.full((4, 10), 2.5, requires_grad=True)
    z = torch.full((4, 10), -1.0)
    loss = tkl(f, z)
    assert float(loss) == 0.0
    loss.backward()
    assert torch.isfinite(f.grad).all()


def test_tkl_gradient_flows_through_f_with_constant_temperatures():
    f, z = _logits(3).requires_grad_(True), _logits(4).requires_grad_(True)
    tau_f, tau_z, _ = aligned_temperatures(f, z)
    tkl(f, z).backward()
    assert z.grad is None
    # Reference in float64: KL(softmax(z / tau_z) || softmax(f / tau_f)), tau constant, probabilities clamped at
    # 1e-12 in the logs (the clamp also stops the gradient of classes below it, as in the official code).
    f64 = f.detach().double().requires_grad_(True)
    p = F.softmax(z.detach().double() / tau_z.double()[:, None], -1)
    q = F.softmax(f64 / tau_f.double()[:, None], -1)
    ref = (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1).mean()
    ref.backward()
    torch.testing.assert_close(f.grad.double(), f64.grad, atol=1e-6, rtol=1e-4)


def test_soft_cross_entropy_is_the_codes_adapter_loss():
    """The code's adapter alignment: -sum softmax(z) log softmax(f) at T = 1, batch mean. It exceeds the
    teacher-first KL by the teacher's entropy (so both have the same gradient) and, unlike TKL, does not neutralise a
    confidence change."""
    f, z = _logits(5).requires_grad_(True), _logits(6)
    loss = soft_cross_entropy(f, z)
    loss.backward()
    f64 = f.detach().double().requires_grad_(True)
    p = torch.exp(z.double()) / torch.exp(z.double()).sum(-1, keepdim=True)
    ref = -(p * (f64 - torch.logsumexp(f64, -1, keepdim=True))).sum(-1).mean()
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(f.grad.double(), f64.grad, rtol=1e-5, atol=1e-7)
    entropy = float(softmax_entropy(z.double()).mean())
    assert float(loss) - float(plain_kl(f, z)) == pytest.approx(entropy, rel=1e-5)
    assert float(soft_cross_entropy(2 * z, z)) - entropy > 0.05 and abs(float(tkl(2 * z, z))) < 1e-6
    # T scales as in the code's GradPurLoss: T^2 times the cross-entropy of the softened distributions.
    t = 2.0
    p_t = torch.softmax(z.double() / t, -1)
    ref_t = -(p_t * torch.log_softmax(f.detach().double() / t, -1)).sum(-1).mean() * t * t
    assert float(soft_cross_entropy(f, z, t)) == pytest.approx(float(ref_t), rel=1e-5)


# -- a hand-written Stage-1 step ------------------------------------------------------------------------------
def _away_from_zero_shot(sim, scale: float = 0.05, seed: int = 1234) -> None:
    """Moves a fresh LoRA branch off B = 0 with seeded noise. At B = 0 the student equals the zero-shot teacher up
    to rounding (TKL ~ 1e-9, g_align ~ 1e-7 of g_task), so the sign test of purification reads float noise that
    differs between CPU kernels and thread counts; a comparison there tests nothing but the kernels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sim.model.peft["global"].named_parameters():
            if name.endswith("_B"):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _cosines(g_task: list[torch.Tensor], g_align: list[torch.Tensor]) -> list[float]:
    return [float(F.cosine_similarity(t.double().flatten(), a.double().flatten(), dim=0)) for t, a in
            zip(g_task, g_align)]


def _hand_tkl(f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """TKL written out directly: a scalar bisection per sample, teacher-first KL, clamped probabilities."""
    rows = []
    for fi, zi in zip(f, z):
        def ent(a, t):
            p = torch.softmax(a.detach() / t, -1)
            return float(-(p * p.clamp_min(1e-30).log()).sum())

        target = 0.5 * (ent(fi, 1.0) + ent(zi, 1.0))
        taus = []
        for a in (fi, zi):
            lo, hi = 0.05, 20.0
            for _ in range(20):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if ent(a, mid) < target else (lo, mid)
            taus.append(0.5 * (lo + hi))
        q = torch.softmax(fi / taus[0], -1).clamp_min(1e-12)
        p = torch.softmax(zi / taus[1], -1).clamp_min(1e-12)
        rows.append((p * (p.log() - q.log())).sum())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("purification", ["per_tensor", "global"])
@pytest.mark.parametrize("peft", ["prompt", "lora"])
def test_hand_written_stage1_step_equals_the_methods_step(tmp_path, peft, purification):
    """One Stage-1 step by hand: the code's per-tensor cosine test, or the paper's single projection of the whole
    concatenated gradient (the default)."""
    sim = _sim(tmp_path, "--method.init_args.lr", "0.05", "--method.init_args.purification", purification,
               peft=peft, model_kwargs="lora_dropout: 0.0")
    m, clip = sim.method, sim.model
    sim.load_client(0)
    _away_from_zero_shot(sim)
    x, y = _batch(sim)
    params = m._global_params
    start = [p.detach().clone() for p in params]
    # By hand: two separate backward passes, per-tensor cosine test, first SGD step with momentum and weight decay.
    f = clip.classify(clip.encode(x, "global"), "global")
    z = clip.zero_shot_logits(x)
    grads = {}
    for name, loss in (("task", F.cross_entropy(f, y)), ("align", _hand_tkl(f, z))):
        for p in params:
            p.grad = None
        loss.backward(retain_graph=True)
        grads[name] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    cos = _cosines(grads["task"], grads["align"])
    # Away from a degenerate point: every sign decision has a margin far above rounding; with LoRA's 12 tensors
    # both branches occur (prompt PEFT has one tensor, the context, which agrees with the teacher here).
    assert min(abs(c) for c in cos) > 0.05, cos
    assert any(c > 0 for c in cos) and (peft == "prompt" or any(c < 0 for c in cos)), cos
    expected = []
    inner = sum(float((gt.double() * ga.double()).sum()) for gt, ga in zip(grads["task"], grads["align"]))
    norm2 = sum(float(ga.double().pow(2).sum()) for ga in grads["align"])
    if purification == "global":
        assert abs(inner) > 0.05 * math.sqrt(norm2 * sum(float(g.double().pow(2).sum()) for g in grads["task"]))
    for p0, gt, ga in zip(start, grads["task"], grads["align"]):
        if purification == "per_tensor":
            cos = F.cosine_similarity(gt.flatten(), ga.flatten(), dim=0)
            g = gt - (gt * ga).sum() / ga.pow(2).sum() * ga if cos < 0 else gt
        else:
            g = gt - (inner / norm2) * ga if inner < 0 else gt
        expected.append(p0 - m.lr * (g + m.weight_decay * p0))  # SGD, first step: buffer = d_p
    for p in params:
        p.grad = None
    # The method's step.
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    m._optimizers = m.configure_optimizers()
    out = m.training_step((x, y), _ctx(sim, 0))
    m._optimizers = []
    assert out.loss is None and float(out.parts["loss"]) == pytest.approx(float(F.cross_entropy(f, y)), rel=1e-5)
    moved = False
    for p, e, p0 in zip(params, expected, start):
        torch.testing.assert_close(p.detach(), e.detach(), atol=1e-6, rtol=1e-5)
        moved |= not torch.equal(p.detach(), p0)
    assert moved


def test_noise_floor_skips_the_projection_at_a_fresh_lora_branch(tmp_path):
    """At B = 0 the alignment gradient is rounding noise: with ``align_noise_floor`` no tensor is projected, and the
    step is plain SGD on the task gradient, whatever the CPU's kernels."""
    sim = _sim(tmp_path, "--method.init_args.lr", "0.05", "--method.init_args.align_noise_floor", "1e-4",
               peft="lora", model_kwargs="lora_dropout: 0.0")
    m, clip = sim.method, sim.model
    sim.load_client(0)
    x, y = _batch(sim)
    params = m._global_params
    start = [p.detach().clone() for p in params]
    g_task = torch.autograd.grad(F.cross_entropy(clip.classify(clip.encode(x, "global"), "global"), y), params,
                                 allow_unused=True)
    expected = [p0 - m.lr * ((torch.zeros_like(p0) if g is None else g) + m.weight_decay * p0)
                for p0, g in zip(start, g_task)]
    m._optimizers = m.configure_optimizers()
    out = m.training_step((x, y), _ctx(sim, 0))
    m._optimizers = []
    assert float(out.parts["conflict"]) == 0.0
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


def test_gradient_scaling_gives_the_same_step(tmp_path):
    """With a gradient scaler (16-mixed), both gradients are taken of the scaled losses, purified (equivariant to a
    common scale) and unscaled by the engine's step: the update equals the unscaled one."""
    sim = _sim(tmp_path, peft="lora", model_kwargs="lora_dropout: 0.0")
    m = sim.method
    sim.load_client(0)
    _away_from_zero_shot(sim)  # at B = 0 the projection decisions are rounding noise, and a non-power-of-two
    x, y = _batch(sim)  # scale below would flip them
    start = [p.detach().clone() for p in m._global_params]
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=3000.0)):  # not a power of two: scaling rounds
        with torch.no_grad():
            for p, p0 in zip(m._global_params, start):
                p.copy_(p0)
        m.trainer.scaler = scaler
        m._optimizers = m.configure_optimizers()
        m.training_step((x, y), _ctx(sim, 0))
        results.append([p.detach().clone() for p in m._global_params])
    m.trainer.scaler, m._optimizers = None, []
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert any(not torch.equal(a, p0) for a, p0 in zip(results[0], start))


# -- Stage 2 (4.9-3) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft", PEFTS)
def test_stage2_leaves_phi_g_bit_identical_and_has_no_gradient_into_it(tmp_path, peft):
    sim = _sim(tmp_path, "--method.init_args.stage2_lr", "0.5", peft=peft)
    m = sim.method
    sim.load_client(1)
    x, y = _batch(sim, 1)
    g_before = [p.detach().clone() for p in m._global_params]
    p_before = [p.detach().clone() for p in m._personal_params]
    loss = m.stage2_loss(x, y)
    grads = torch.autograd.grad(loss, m._global_params + m._personal_params, allow_unused=True)
    assert all(g is None or not g.any() for g in grads[: len(m._global_params)])
    assert any(g is not None and g.any() for g in grads[len(m._global_params):])
    steps = m.train_personal(_ctx(sim, 1), sim.data.client_indices[1], 1)
    assert steps > 0
    assert all(torch.equal(p, b) for p, b in zip(m._global_params, g_before))
    assert any(not torch.equal(p, b) for p, b in zip(m._personal_params, p_before))
    assert all(p.grad is None for p in m._global_params)


def test_stage2_loss_formula_and_lambda_one_ignores_the_global_branch(tmp_path):
    sim = _sim(tmp_path)
    m, clip = sim.method, sim.model
    sim.load_client(2)
    x, y = _batch(sim, 2)
    with torch.no_grad():
        l_g, l_p = m.branch_logits(x)
        expected = 0.1 * F.cross_entropy(l_g + l_p, y) + 0.9 * F.cross_entropy(l_p, y)
        assert float(m.stage2_loss(x, y)) == pytest.approx(float(expected), rel=1e-6)
        m.lam = 1.0
        only_p = m.stage2_loss(x, y)
        assert torch.equal(only_p, F.cross_entropy(l_p, y))
        clip.peft["global"].ctx.add_(torch.randn_like(clip.peft["global"].ctx))  # a very different phi_g
        assert torch.equal(m.stage2_loss(x, y), only_p)


@pytest.mark.parametrize("peft", ["adapter", "attention_adapter"])
def test_adapter_alignment_option_is_a_hand_written_soft_cross_entropy(tmp_path, peft):
    """``adapter_alignment="soft_ce"`` (the code's adapter variant): L_align = -mean_b sum_c softmax(z) log softmax(f)
    at T = 1, with its gradient w.r.t. phi_g; the default (None: as ``alignment``) is the TKL, a different loss."""
    sim = _sim(tmp_path, "--method.init_args.adapter_alignment", "soft_ce", peft=peft)
    m, clip = sim.method, sim.model
    sim.load_client(0)
    x, y = _batch(sim)
    assert m.active_alignment == "soft_ce"
    _, align, _ = m.stage1_losses(x, y, _ctx(sim, 0))
    got = torch.autograd.grad(align, m._global_params)
    f = clip.classify(clip.encode(x, "global"), "global").double()
    z = clip.zero_shot_logits(x).double()
    p = torch.exp(z - torch.logsumexp(z, -1, keepdim=True))
    ref = -(p * (f - torch.logsumexp(f, -1, keepdim=True))).sum(-1).mean()
    want = torch.autograd.grad(ref, m._global_params)
    assert float(align) == pytest.approx(float(ref), rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-7)
    # Paper mode (the default): TKL, which differs from the soft CE by more than the teacher's entropy.
    m.adapter_alignment = None
    assert m.active_alignment == "tkl"
    _, align_tkl, _ = m.stage1_losses(x, y, _ctx(sim, 0))
    assert float(align_tkl) == pytest.approx(float(_hand_tkl(f.float(), z.float())), rel=1e-4, abs=1e-6)
    assert abs(float(align) - float(align_tkl)) > 0.1
    # The option only concerns adapters: prompt PEFT keeps ``alignment``.
    prompt = _sim(tmp_path / "p", "--method.init_args.adapter_alignment", "soft_ce").method
    assert prompt.active_alignment == "tkl"


def test_adapter_fusion_only_defaults_to_the_papers_stage2_loss(tmp_path):
    """Default (paper): adapters use L_k with lam like the other PEFT kinds; ``adapter_fusion_only=True`` (code):
    the fused CE alone, for both adapter kinds."""
    assert FedPuReL().adapter_fusion_only is False
    assert FedPuReL.released_code == {"lam": 0.99, "share_optimizer_state": True, "adapter_alignment": "soft_ce",
                                      "adapter_fusion_only": True, "purification": "per_tensor",
                                      "stage2": "interleaved", "full_first_round": True}
    default = FedPuReL()  # the paper: one purification vector, Stage 2 after training, the sampled cohort
    assert (default.purification, default.stage2, default.full_first_round) == ("global", "post_hoc", False)
    sim = _sim(tmp_path, "--method.init_args.adapter_fusion_only", "false", peft="attention_adapter")
    m = sim.method
    assert m.stage2_lambda == 0.9
    x, y = _batch(sim, 3)
    with torch.no_grad():
        l_g, l_p = m.branch_logits(x)
        paper = 0.1 * F.cross_entropy(l_g + l_p, y) + 0.9 * F.cross_entropy(l_p, y)
        assert float(m.stage2_loss(x, y)) == pytest.approx(float(paper), rel=1e-6)
        m.adapter_fusion_only = True
        assert m.stage2_lambda == 0.0
        code = F.cross_entropy(l_g + l_p, y)
        assert float(m.stage2_loss(x, y)) == pytest.approx(float(code), rel=1e-6)
        assert abs(float(paper) - float(code)) > 1e-3


def test_adapter_stage2_uses_the_fused_ce_only(tmp_path):
    sim = _sim(tmp_path, "--method.init_args.adapter_fusion_only", "true", peft="adapter")
    m = sim.method
    assert m.stage2_lambda == 0.0
    x, y = _batch(sim, 3)
    with torch.no_grad():
        l_g, l_p = m.branch_logits(x)
        assert float(m.stage2_loss(x, y)) == pytest.approx(float(F.cross_entropy(l_g + l_p, y)), rel=1e-6)
    m.adapter_fusion_only = False
    assert m.stage2_lambda == 0.9


# -- uploads, store, cohorts (4.9-4, 4.4) --------------------------------------------------------------------
@pytest.mark.parametrize("peft", PEFTS)
def test_one_round_uploads_only_the_global_peft_tensors(tmp_path, peft):
    sim = _sim(tmp_path, "--method.init_args.full_first_round", "true", "--method.init_args.stage2", "interleaved",
               peft=peft)
    uploads = []
    accumulate = sim.reducer.accumulate
    sim.reducer.accumulate = lambda u: (uploads.append(sorted(u.tensors)), accumulate(u))[1]
    frozen = set(sim.model.frozen_state_keys())
    personal_default = {k: v.clone() for k, v in sim._default_personal.items()}
    before = {k: v.clone() for k, v in sim.global_state.items()}
    result = sim.run_round(1)
    assert result.cohort == list(range(sim.data.num_clients))  # round 1: every client (code)
    assert len(uploads) == sim.data.num_clients
    global_keys = sorted(sim.global_state)
    assert global_keys and all(k.startswith("peft.global.") for k in global_keys)
    assert not frozen & set(global_keys)
    assert all(keys == global_keys for keys in uploads)
    assert all(not torch.equal(before[k], v) for k, v in sim.global_state.items() if k.endswith(("ctx", "_B"))
               or "adapter" in k)
    assert math.isfinite(result.metrics["train/loss"]) and result.metrics["train/loss"] > 0
    assert {"train/loss_tkl_teacher_first", "train/loss_tkl_reverse", "train/loss_conflict"} <= set(result.metrics)
    # The store holds only personal PEFT tensors (no backbone, nothing global), and every client trained phi_k.
    states = _personal(sim)
    assert sorted(states) == list(range(sim.data.num_clients))
    for state in states.values():
        assert sorted(state) == sorted("model." + k for k in personal_default)
        assert all(k.startswith("model.peft.personal.") for k in state)
        assert any(not torch.equal(state["model." + k], v) for k, v in personal_default.items())
    if peft == "prompt":
        metrics = sim.evaluate()
        assert 0.0 <= metrics["test/global/acc"] <= 1.0 and 0.0 <= metrics["test/personal/acc_mean"] <= 1.0
        assert "test/global/balancedness" in metrics and "test/personal/balancedness" in metrics


def test_interleaved_stage2_changes_exactly_the_cohorts_personal_branches(tmp_path):
    sim = _sim(tmp_path, "--method.init_args.stage2", "interleaved", "--method.init_args.full_first_round", "true")
    sim.run_round(1)
    before = _personal(sim)
    global_before = {k: v.clone() for k, v in sim.global_state.items()}
    result = sim.run_round(2)
    expected = sample_cohort(sim.seed, 2, sim.data.num_clients, sim.clients_per_round)
    assert result.cohort == expected and len(expected) == sim.clients_per_round < sim.data.num_clients
    after = _personal(sim)
    changed = sorted(c for c in after if any(not torch.equal(after[c][k], before[c][k]) for k in after[c]))
    assert changed == expected
    assert any(not torch.equal(global_before[k], v) for k, v in sim.global_state.items())


def test_without_full_first_round_round_one_uses_the_uniform_sampler(tmp_path):
    sim = _sim(tmp_path)  # default: the paper's sampled cohort in every round
    assert sim.run_round(1).cohort == sample_cohort(sim.seed, 1, sim.data.num_clients, sim.clients_per_round)


def test_post_hoc_trains_every_client_after_the_last_round(tmp_path):
    sim = _sim(tmp_path)  # default: the paper's Stage 2 after Stage 1
    assert not sim.method.runs_after_aggregation
    default = {k: v.clone() for k, v in sim._default_personal.items()}
    for r in (1, 2):
        sim.run_round(r)
    for state in _personal(sim).values():  # no Stage 2 during the rounds
        assert all(torch.equal(state["model." + k], v) for k, v in default.items())
    final_global = {k: v.clone() for k, v in sim.global_state.items()}
    assert sim.method.on_fit_end(sim) is True
    states = _personal(sim)
    assert sorted(states) == list(range(sim.data.num_clients))
    for state in states.values():
        assert all(k.startswith("model.peft.personal.") for k in state)
        assert any(not torch.equal(state["model." + k], v) for k, v in default.items())
    assert all(torch.equal(final_global[k], v) for k, v in sim.global_state.items())
    assert math.isfinite(sim.evaluate()["test/personal/acc_mean"])


def test_interleaved_needs_no_post_training_stage(tmp_path):
    sim = _sim(tmp_path, "--method.init_args.stage2", "interleaved")
    assert sim.method.runs_after_aggregation and sim.method.on_fit_end(sim) is None


# -- inference (4.9-5) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft", PEFTS)
def test_pm_is_exactly_lg_plus_lp_and_gm_ignores_phi_k(tmp_path, peft):
    sim = _sim(tmp_path, peft=peft)
    m, clip = sim.method, sim.model
    clip.eval()
    x, _ = _batch(sim, 4)
    with torch.no_grad():
        for p in m._global_params + m._personal_params:  # non-trivial branches (LoRA B starts at zero)
            p.add_(0.05 * torch.randn_like(p))
        l_g = clip.classify(clip.encode(x, "global"), "global")
        l_p = clip.classify(clip.encode(x, "personal"), "personal")
        assert torch.equal(m.predict_personal(x, 4), l_g + l_p)
        gm = m.predict_global(x)
        assert torch.equal(gm, l_g)
        for p in m._personal_params:
            p.add_(torch.randn_like(p))
        assert torch.equal(m.predict_global(x), gm)
        assert not torch.equal(m.predict_personal(x, 4), l_g + l_p)
    assert m.personalizes and m.has_global_model


# -- options and errors ----------------------------------------------------------------------------------------
def test_shared_optimizer_state_carries_momentum_across_clients(tmp_path):
    sim = _sim(tmp_path, "--method.init_args.share_optimizer_state", "true")
    m = sim.method
    (opt,) = m.configure_optimizers()
    assert m.configure_optimizers()[0] is opt
    sim.run_round(1)
    assert m.configure_optimizers()[0] is opt and len(opt.state) == len(m._global_params)
    state = m.server_state_dict()
    assert set(state) == {"optimizer"}
    other = _sim(tmp_path / "b", "--method.init_args.share_optimizer_state", "true")
    other.method.load_server_state_dict(state)
    (restored,) = other.method.configure_optimizers()
    for p, q in zip(m._global_params, other.method._global_params):
        assert torch.equal(opt.state[p]["momentum_buffer"], restored.state[q]["momentum_buffer"])
    fresh = _sim(tmp_path / "c").method
    assert fresh.configure_optimizers()[0] is not fresh.configure_optimizers()[0]
    assert fresh.server_state_dict() == {}


def test_personal_branch_init_is_seeded_and_identical_for_every_client(tmp_path):
    a, b = _sim(tmp_path / "a"), _sim(tmp_path / "b")
    for k, v in a._default_personal.items():
        assert torch.equal(v, b._default_personal[k])
    assert not torch.equal(a.model.peft["personal"].ctx, a.model.peft["global"].ctx)


def test_rejects_bad_arguments_and_non_clip_models(tmp_path):
    for kwargs in ({"purification": "x"}, {"stage2": "x"}, {"align_direction": "x"}, {"lam": 1.5},
                   {"alignment": "x"}, {"adapter_alignment": "x"}, {"tau_min": 0.0}):
        with pytest.raises(ValueError):
            FedPuReL(**kwargs)
    with pytest.raises(ValueError, match="CLIP"):
        _sim(tmp_path, "--model.name", "cnn", "--model.kwargs", "{}")
    with pytest.raises(ValueError, match="head"):
        _sim(tmp_path / "b", model_kwargs="head: linear")
