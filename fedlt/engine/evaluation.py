"""GM and PM evaluation, sharded over ranks and synced through torchmetrics.

* GM: the global model on the balanced global test set (``test/global/*``).
* PM: every client's personalized model on its own local test set (``test/personal/*``), over all K clients.
  For a method without personal state the PM of every client is the global model, so the global test set is
  predicted once and each client's local test set (a subset of it, docs/reference.md 1.5) is read off by index.
* With ``data.mask_absent_classes`` (FedLoGe's evaluation, docs/reference.md 1.5), a client's PM can only predict the
  classes present in its local test set; every client is then predicted with its own mask.
* Both metrics are fed predicted *labels* (argmax), which also fill the predicted-class count states behind the
  FedPuReL balancedness candidates (definition pending, docs/reference.md 1.7): ``test/global/{balancedness,
  acc_worst_class, acc_minmax_ratio, acc_worst10_classes, acc_class_std, pred_minmax_ratio}`` and, per client then
  averaged, ``test/personal/{balancedness, acc_worst_class_mean, acc_minmax_ratio_mean, acc_worst10_classes_mean,
  acc_class_std_mean, pred_minmax_ratio_mean}`` (``balancedness`` = the worst-class candidate (a)). On the fast
  path the PM predictions are the global predictions read off by index, on the per-client path (and with masking)
  each client's own masked argmax.
* Multi-domain data (docs/reference.md 1.8): GM accuracy per domain of the test set (the held-out target domain,
  ``test/domain/<name>/acc``) and on the source domains' held-out validation images (``val/domain/<name>/acc``
  and ``val/acc``, for model selection by training-domain validation). Without local test sets (the default for
  domain data) no PM is evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fedlt.metrics import GroupedAccuracy, PersonalizedAccuracy

if TYPE_CHECKING:
    from fedlt.engine.simulator import Simulator


class Evaluator:
    """Evaluates the simulator's current global (and personal) models."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        data = sim.data
        groups = torch.as_tensor(data.groups, dtype=torch.long)
        self.gm = GroupedAccuracy(data.num_classes, groups).to(sim.device)
        client_groups = getattr(data, "client_groups", None)  # (K, C) with data.pm_group_source="local_test"
        pm_groups = groups if client_groups is None else torch.as_tensor(client_groups, dtype=torch.long)
        self.pm = PersonalizedAccuracy(data.num_clients, data.num_classes, pm_groups).to(sim.device)
        self._masking = bool(getattr(data, "mask_absent_classes", False))
        self._client_counts: Tensor | None = None  # (2, K) this rank's PM correct / total of the last evaluation
        self._union: Tensor | None = None  # sorted union of the clients' local test indices (batched PM)

    def _batches(self, idx: Tensor, split=None):
        data, bs = self.sim.data, self.sim.eval_batch_size
        split = data.test if split is None else split
        for start in range(0, int(idx.numel()), bs):
            batch = data.get_batch(split, idx[start : start + bs], None, train=False)
            yield batch[0], batch[1]

    def _load_global(self) -> None:
        self.sim.load_global()

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        """Returns ``test/global/*`` and ``test/personal/*`` metrics (identical on every rank)."""
        sim, method = self.sim, self.sim.method
        sim.model.eval()
        out: dict[str, float] = {}
        self._client_counts = None
        preds = None
        if method.has_global_model:
            self._load_global()
            preds = self._global_predictions()
            out.update(_prefixed("test/global/", self.gm.compute()))
            self.gm.reset()
            out.update(self._domain_metrics())
        if any(int(i.numel()) for i in sim.data.client_test_indices):
            clients = range(sim.rank, sim.data.num_clients, sim.world_size)
            if preds is not None and not method.personalizes and not self._masking:
                self._pm_from_global(preds, clients)
            elif method.personalizes and getattr(method, "pm_shares_features", False):
                self._pm_shared_features(clients)
            else:
                self._pm_personal(clients)
            self._client_counts = torch.stack([self.pm.correct.sum(1), self.pm.total.sum(1)])  # local, pre-sync
            out.update(_prefixed("test/personal/", self.pm.compute()))
            self.pm.reset()
        sim.model.train()
        return out

    def client_accuracies(self) -> dict[str, Any] | None:
        """Per-client PM accuracy of the last evaluation, from its count states (no extra evaluation pass).

        A collective (one sum all-reduce of 2K counts): every rank calls it.

        Returns:
            ``{"acc": [...], "num_test": [...]}`` indexed by client id (``acc`` is ``None`` for a client without
            local test samples), or ``None`` when the last evaluation had no PM (e.g. domain data).
        """
        if self._client_counts is None:
            return None
        counts = self.sim.comm.sum_(self._client_counts.clone()).tolist()
        return {"acc": [c / t if t else None for c, t in zip(*counts)], "num_test": counts[1]}

    def _global_predictions(self, split=None) -> Tensor:
        """Predicted labels of a whole split (default: the global test set) on every rank; the GM metric is
        updated on this rank's shard of the test set."""
        sim = self.sim
        test = split is None
        n, bs = len(sim.data.test if test else split), sim.eval_batch_size
        # Whole batches go to ranks round robin: every batch is the same tensor whatever the world size, so the
        # forward passes (and near-tie argmaxes) are bitwise those of a single process.
        starts = range(sim.rank * bs, n, sim.world_size * bs)
        shard = torch.cat([torch.arange(s, min(s + bs, n)) for s in starts]).to(sim.device) if starts else \
            torch.zeros(0, dtype=torch.long, device=sim.device)
        preds = torch.zeros(n, device=sim.device)
        with sim.trainer.autocast():
            for (x, y), start in zip(self._batches(shard, split), range(0, int(shard.numel()), bs)):
                p = sim.method.predict_global(x).argmax(1)
                if test:
                    self.gm.update(p, y)
                preds[shard[start : start + sim.eval_batch_size]] = p.float()
        # Sum of disjoint shards = every prediction on every rank (needed for PM by index).
        preds = sim.comm.sum_(preds).long()
        if test:
            self._test_preds = preds
        return preds

    def _domain_metrics(self) -> dict[str, float]:
        """Per-domain GM accuracy on the test set (target domain) and the source-domain validation set."""
        data = self.sim.data
        names = getattr(data, "domain_names", [])
        if not names or data.test.domain is None:
            return {}
        out = _per_domain("test/domain/", self._test_preds, data.test, names)
        val = getattr(data, "val", None)
        if val is not None and len(val):
            preds = self._global_predictions(val)
            out.update(_per_domain("val/domain/", preds, val, names))
            out["val/acc"] = float((preds == val.y).float().mean())
        return out

    def _pm_from_global(self, preds: Tensor, clients: range) -> None:
        data = self.sim.data
        idx = [data.client_test_indices[k] for k in clients]
        self._update_pm([preds[i] for i in idx], [data.test.y[i] for i in idx], list(clients))

    def _update_pm(self, preds: list[Tensor], targets: list[Tensor], clients: list[int]) -> None:
        """One metric update for all of this rank's clients (each update costs O(K x C): a per-client update would
        make the evaluation quadratic in K)."""
        pairs = [(p, t, k) for p, t, k in zip(preds, targets, clients) if t.numel()]
        if not pairs:
            return
        device = pairs[0][1].device
        ids = torch.cat([torch.full((t.numel(),), k, dtype=torch.long, device=device) for _, t, k in pairs])
        self.pm.update(torch.cat([p for p, _, _ in pairs]), torch.cat([t for _, t, _ in pairs]), ids)

    def _mask(self, logits: Tensor, k: int) -> Tensor:
        if not self._masking:
            return logits
        present = self.sim.data.client_test_classes[k]
        return logits.masked_fill(~present, torch.finfo(logits.dtype).min)

    @torch.no_grad()
    def _predict_personal(self, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
        sim = self.sim
        preds, targets = [], []
        with sim.trainer.autocast():
            for x, y in self._batches(idx):
                preds.append(self._mask(sim.method.predict_personal(x, k), k).argmax(1))
                targets.append(y)
        return torch.cat(preds), torch.cat(targets)

    def _pm_personal(self, clients: range) -> None:
        sim = self.sim
        preds, targets, ids = [], [], []
        for k in clients:
            idx = sim.data.client_test_indices[k]
            if not idx.numel():
                continue
            sim.load_client(k)
            with torch.enable_grad():  # evaluation runs under no_grad; personal fine-tuning needs gradients
                sim.method.prepare_personal(k)
            sim.model.eval()
            p, t = self._predict_personal(idx, k)
            preds.append(p)
            targets.append(t)
            ids.append(k)
        self._update_pm(preds, targets, ids)

    def _test_union(self) -> Tensor:
        """Sorted union of all clients' local test indices (fixed for a run: computed once)."""
        if self._union is None:
            indices = [i for i in self.sim.data.client_test_indices if i.numel()]
            self._union = torch.unique(torch.cat(indices))
        return self._union

    @torch.no_grad()
    def _pm_shared_features(self, clients: range) -> None:
        """PM of a personal head on the shared body (``method.pm_shares_features``): the body's features of the test
        images this rank's clients need, once; then each client's head on its rows.

        The batches are fixed slices of the sorted union of every client's local test images (the same on every
        rank); a rank computes the slices that hold one of its images, so an image's features come from the same
        batch whatever the split of the clients over ranks or the world size."""
        sim, method, data = self.sim, self.sim.method, self.sim.data
        wanted = [k for k in clients if data.client_test_indices[k].numel()]
        if not wanted:
            return
        n, bs = len(data.test), sim.eval_batch_size
        union = self._test_union()
        position = torch.searchsorted(union, torch.cat([data.client_test_indices[k] for k in wanted]))
        blocks = torch.unique(position // bs).tolist()
        rows = torch.cat([union[j * bs:(j + 1) * bs] for j in blocks])
        row = torch.full((n,), -1, dtype=torch.long, device=union.device)
        row[rows] = torch.arange(rows.numel(), device=union.device)
        self._load_global()
        sim.model.eval()
        with sim.trainer.autocast():
            features = torch.cat([method.pm_features(x) for x, _ in self._batches(rows)])
            if self._stackable_head():
                self._pm_stacked_heads(wanted, features, row)
                return
            preds, targets = [], []
            for k in wanted:
                idx = data.client_test_indices[k]
                sim.load_personal(k)
                preds.append(self._mask(method.pm_logits(features[row[idx]], k), k).argmax(1))
                targets.append(data.test.y[idx])
        self._update_pm(preds, targets, wanted)


    def _stackable_head(self) -> bool:
        """Whether PM logits are the default ``model.head(features)`` with a head of plain layers, so that every
        client's personal head can run at once (stacked parameters, ``torch.func.vmap``)."""
        from fedlt.methods.base import FedMethod

        method = self.sim.method
        head = getattr(self.sim.model, "head", None)
        return (type(method).pm_logits is FedMethod.pm_logits and isinstance(head, nn.Module)
                and all(type(m) in _STACKABLE for m in head.modules()))

    def _pm_stacked_heads(self, wanted: list[int], features: Tensor, row: Tensor) -> None:
        """Every wanted client's personal head on its rows of ``features``. Clients that hold no head of their own
        (never trained) share the default head: one call for all of them. The others go a chunk of clients per
        call: their head tensors stacked, their rows padded to the longest local test set of the chunk."""
        from torch.func import functional_call, vmap

        sim, data = self.sim, self.sim.data
        head = sim.model.head
        personal = list(sim._ws_personal)  # model keys "head.*"
        defaults = {_MODEL + key: sim._default_personal[key] for key in personal}
        own = sim.store.holding(wanted, list(defaults))
        preds, targets, ids = [], [], []
        shared = [k for k, has in zip(wanted, own) if not has]
        if shared:  # the workspace holds the default personal head (the global state is loaded)
            idx = torch.cat([data.client_test_indices[k] for k in shared])
            who = torch.repeat_interleave(torch.tensor(shared, device=idx.device), torch.tensor(
                [int(data.client_test_indices[k].numel()) for k in shared], device=idx.device))
            out = head(features[row[idx]])
            if self._masking:
                out = out.masked_fill(~data.client_test_classes[who], torch.finfo(out.dtype).min)
            preds.append(out.argmax(1))
            targets.append(data.test.y[idx])
            ids.append(who)
        wanted = [k for k, has in zip(wanted, own) if has]
        if wanted:
            fixed = {n: t for n, t in list(head.named_parameters()) + list(head.named_buffers())
                     if f"head.{n}" not in sim._ws_personal}

            def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
                return functional_call(head, {**params, **fixed}, (x,))

            batched = vmap(logits)
            per_client = sum(int(sim._default_personal[k].numel()) for k in personal)
            sizes = [int(data.client_test_indices[k].numel()) for k in wanted]
            per_row = max(sizes) * (features.shape[1] + data.num_classes) + per_client  # features, logits, head
            chunk = max(1, min(len(wanted), _STACK_ELEMENTS // per_row))
            for a in range(0, len(wanted), chunk):
                clients = wanted[a : a + chunk]
                stacked = sim.store.stack(clients, list(defaults), defaults)
                params = {key.removeprefix(_MODEL + "head."): v for key, v in stacked.items()}
                client_idx = [data.client_test_indices[k] for k in clients]
                lengths = torch.tensor(sizes[a : a + chunk], device=features.device)
                padded = nn.utils.rnn.pad_sequence([row[i] for i in client_idx], batch_first=True)  # (n, longest) rows
                out = batched(params, features[padded])  # (n, longest, C)
                if self._masking:
                    present = data.client_test_classes[torch.tensor(clients, device=out.device)]
                    out = out.masked_fill(~present.unsqueeze(1), torch.finfo(out.dtype).min)
                valid = torch.arange(padded.shape[1], device=out.device) < lengths.unsqueeze(1)
                preds.append(out.argmax(2)[valid])
                targets.append(data.test.y[torch.cat(client_idx)])
                ids.append(torch.repeat_interleave(torch.tensor(clients, device=features.device),
                                                   lengths.to(features.device)))
        self.pm.update(torch.cat(preds), torch.cat(targets), torch.cat(ids))


_STACKABLE = (nn.Linear, nn.Sequential, nn.Identity, nn.ReLU, nn.Flatten, nn.Dropout)
_STACK_ELEMENTS = 1 << 24  # elements of one chunk's gathered features, logits and stacked heads (64 MB in float32)
_MODEL = "model."


def _per_domain(prefix: str, preds: Tensor, split, names: list[str]) -> dict[str, float]:
    correct = (preds == split.y).float()
    out = {}
    for d in torch.unique(split.domain).tolist():
        mask = split.domain == d
        out[f"{prefix}{names[d]}/acc"] = float(correct[mask].mean())
    return out


def _prefixed(prefix: str, values: dict[str, Tensor]) -> dict[str, float]:
    return {prefix + k: float(v) for k, v in values.items()}
