"""The round loop: broadcast -> sample -> shard -> local fit -> reduce -> server step -> evaluate.

One workspace model per rank is loaded with ``copy_`` for every client (never a per-client deepcopy, never
``fabric.setup`` on a client model: DDP would average gradients of *different* clients). Fabric provides the
processes, the device, the precision context and the collectives.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from fedlt.engine.client_state import ClientStateStore
from fedlt.engine.comm import Comm, RunInfo
from fedlt.engine.evaluation import Evaluator
from fedlt.engine.exact import ExactSum, ExactSumOverflow, sum_host_rows
from fedlt.engine.faults import failpoint
from fedlt.engine.local_loop import COUNT, LocalTrainer, NonFiniteLossError, part_metric
from fedlt.engine.params import copy_tensors_, model_tensors, snapshot, split_keys
from fedlt.engine.sharding import assign_to_ranks, client_seed, derive_seed, sample_cohort, seed_global_rng
from fedlt.types import ClientContext, ServerMessage

if TYPE_CHECKING:
    from fedlt.engine.vectorized import VectorizedCohort
    from fedlt.methods.base import FedMethod
    from fedlt.models.base import FedModel

_MODEL = "model."
_SECOND_PASS = 0x2B5F1A  # separates the generator stream of the after-aggregation pass from the local fit
_GLOBAL_RNG_TAG = 0x5DEECE66D  # separates the global RNG's stream (dropout) from the client generator's
T = TypeVar("T")


@dataclass
class RoundResult:
    """What one round produced (on every rank)."""

    round: int
    cohort: list[int]
    metrics: dict[str, float]


class Simulator:
    """Simulates federated training of ``method`` on ``data`` with ``model`` over the ranks of ``fabric``.

    Args:
        fabric: a launched ``lightning.Fabric`` (or ``None`` for a single CPU process without Fabric).
        data: a :class:`fedlt.data.FederatedDataset` (set up on the device by :meth:`setup`).
        model: the model; its initial weights are the round-0 global model.
        method: the federated method.
        rounds: number of server rounds R.
        clients_per_round: cohort size; ``>= num_clients`` is full participation.
        eval_every: evaluate GM/PM every this many rounds (and always after the last round); 0 disables.
        seed: experiment seed (cohorts, client generators).
        client_state: where per-client persistent tensors live: ``memory``, ``cpu`` or ``disk``.
        run_dir: the run directory (disk client state, checkpoints).
        eval_batch_size: batch size of evaluation forward passes.
        precision: Fabric precision string (for gradient scaling).
        cohort_sampler: replaces :func:`sample_cohort` (signature ``(seed, round, num_clients, m) -> ids``).
        client_seed_fn: replaces :func:`client_seed` (signature ``(seed, round, client_id) -> int``).
        exact_reduction: exact, order-independent sums of the client contributions (see
            :mod:`fedlt.engine.exact`); ``False`` makes the reducer sum in float.
    """

    def __init__(
        self,
        fabric: Any,
        data: Any,
        model: FedModel,
        method: FedMethod,
        rounds: int = 10,
        clients_per_round: int = 10,
        eval_every: int = 1,
        seed: int = 0,
        client_state: str = "cpu",
        run_dir: str | Path | None = None,
        eval_batch_size: int = 512,
        precision: str = "32-true",
        cohort_sampler: Callable[[int, int, int, int], Sequence[int]] | None = None,
        client_seed_fn: Callable[[int, int, int], int] | None = None,
        exact_reduction: bool = True,
        vectorize_cohort: bool = False,
    ) -> None:
        self.fabric = fabric
        self.data = data
        self.model = model
        self.method = method
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.eval_every = eval_every
        self.seed = seed
        self.client_state_mode = client_state
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.eval_batch_size = eval_batch_size
        self.precision = precision
        self.cohort_sampler = cohort_sampler or sample_cohort
        self.client_seed_fn = client_seed_fn or client_seed
        self.vectorize_cohort = vectorize_cohort
        self._vectorized: VectorizedCohort | None = None  # set up with vectorize_cohort
        self.exact_reduction = exact_reduction
        self.round = 0  # last completed round
        self.comm = Comm(fabric)  # the one view of the other ranks (a single process without Fabric)
        self._loss_names: list[str] = []  # loss part names agreed across ranks
        self._is_setup = False

    # -- properties --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.comm.device

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def global_state(self) -> dict[str, Tensor]:
        """The shared global tensors (identical on every rank after each round)."""
        return self.reducer.global_state

    # -- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> Simulator:
        """Moves data and model to the device and wires method, reducer and client store. Idempotent."""
        if self._is_setup:
            return self
        device = self.device
        if hasattr(self.data, "setup"):
            self.data.setup(device)
        self.model.to(device)
        self.trainer = LocalTrainer(self.data, self.fabric, self.precision)
        # Server-side generators derive from run.seed (never the global RNG or the rank); schedules read run.rounds.
        self.method.run = RunInfo(seed=self.seed, rounds=self.rounds, comm=self.comm)
        self.method.setup(self.model, self.data, self.trainer)
        tensors = model_tensors(self.model)
        shared_keys, personal_keys = split_keys(tensors, self.method.is_personal)
        self.method.shared_tensors = {k: tensors[k] for k in shared_keys}
        self.method.personal_keys = tuple(personal_keys)
        self._ws_shared = [tensors[k] for k in shared_keys]
        self._ws_personal = {k: tensors[k] for k in personal_keys}
        self._default_personal = snapshot(tensors, personal_keys)
        self.reducer = self.method.configure_reducer()
        if not self.exact_reduction:
            self.reducer.exact = False
        self.reducer.setup(snapshot(tensors, shared_keys), device)
        self._global_list = [self.reducer.global_state[k] for k in shared_keys]
        template = {_MODEL + k: v for k, v in self._default_personal.items()}
        template.update(self.method.client_state_template())
        store_dir = self.run_dir / "client_state" if self.run_dir is not None else None
        self.store = ClientStateStore(self.client_state_mode, device, store_dir)
        self.store.set_template(template)
        self.evaluator = Evaluator(self)
        self._sizes = [int(i.numel()) for i in self.data.client_indices]
        self._class_counts = [
            torch.bincount(self.data.train.y[i], minlength=self.data.num_classes).float()
            for i in self.data.client_indices
        ]
        if self.vectorize_cohort:
            from fedlt.engine.vectorized import VectorizedCohort  # torch.func: only for runs that use it

            self._vectorized = VectorizedCohort(self)  # refuses an unsupported method / model / precision
        self._is_setup = True
        return self

    # -- one client ----------------------------------------------------------------------------------------
    def load_client(self, client_id: int) -> dict[str, Tensor]:
        """Loads the global shared state and the client's personal model state into the workspace.

        Returns:
            The client's non-model persistent state.
        """
        copy_tensors_(self._ws_shared, self._global_list)
        stored = self.store.get(client_id)
        if self._ws_personal:
            src = {k: stored.get(_MODEL + k, self._default_personal[k]) for k in self._ws_personal}
            copy_tensors_(list(self._ws_personal.values()), [src[k] for k in self._ws_personal])
        return {k: v for k, v in stored.items() if not k.startswith(_MODEL)}

    def load_personal(self, client_id: int) -> None:
        """Loads only the client's personal model state into the workspace (the shared tensors stay as they are;
        the batched PM evaluation loads the global state once, then each client's personal tensors)."""
        if self._ws_personal:
            stored = self.store.get(client_id)
            copy_tensors_(list(self._ws_personal.values()),
                          [stored.get(_MODEL + k, self._default_personal[k]) for k in self._ws_personal])

    def load_global(self) -> None:
        """Loads the global shared state and the default personal state (the GM) into the workspace."""
        copy_tensors_(self._ws_shared, self._global_list)
        if self._ws_personal:
            copy_tensors_(list(self._ws_personal.values()), [self._default_personal[k] for k in self._ws_personal])

    def save_client(self, client_id: int, state: dict[str, Tensor]) -> None:
        """Stores the workspace's personal tensors and ``state`` (the client's other persistent tensors)."""
        persistent = {_MODEL + k: v for k, v in self._ws_personal.items()}
        persistent.update(state)
        self.store.put(client_id, persistent)

    def client_pass(self, client_id: int, message: ServerMessage, seed: int, body: Callable[[ClientContext], T]) -> T:
        """The one way code runs on a client: loads its state into the workspace, seeds its generator and the
        global RNG from ``seed``, runs ``body(ctx)``, saves its persistent state, and returns what ``body`` did.

        Every client pass (the local fit, the after-aggregation pass, a method's post-training stage) goes through
        here, so a client's random streams depend only on ``seed``: never on the rank, the world size, the clients
        a rank ran before it, or a resume.
        """
        state = self.load_client(client_id)
        # Layers that draw from the global RNG (dropout) get a stream fixed by the seed too.
        seed_global_rng(seed ^ _GLOBAL_RNG_TAG, self.device)
        ctx = ClientContext(client_id=client_id, round=message.round, num_samples=self._sizes[client_id],
                            class_counts=self._class_counts[client_id], generator=torch.Generator().manual_seed(seed),
                            device=self.device, message=message, state=state)
        out = body(ctx)
        self.save_client(client_id, ctx.state)
        return out

    def client_sums(self, body: Callable[[ClientContext, Tensor], Sequence[Tensor | None]], sizes: Sequence[int],
                    tag: int, clients: Sequence[int] | None = None,
                    references: Sequence[float] | None = None) -> list[Tensor]:
        """Server-side statistics gathered from clients: the sums over ``clients`` (default: every client) of what
        ``body(ctx, train_indices)`` returns, one tensor (or ``None``: nothing) per segment of ``sizes`` elements.

        Each client runs once, on one rank, through :meth:`client_pass` on the current global model (seeded from
        the run seed, ``tag`` and the client id); the sums are exact (:class:`~fedlt.engine.exact.ExactSum`), so
        every rank returns the same float64 tensors, bit for bit, for any world size. A collective: every rank
        calls it. A post-training stage collects class statistics with it (CCVR's feature means and
        covariances), a server step any other per-client quantity.

        Args:
            body: what a client contributes; its tensors are flattened into the segments.
            sizes: the number of elements of each segment.
            tag: separates the clients' seeds from those of their other passes.
            clients: the clients that contribute.
            references: a magnitude per segment that every rank knows (default 1): the sums keep 52 bits below
                it and may reach about 2^30 times it.

        Returns:
            One float64 tensor per segment (flat), the sum over the clients.
        """
        chosen = list(range(self.data.num_clients)) if clients is None else sorted(set(clients))
        acc = ExactSum(list(sizes), self.device)
        if references is not None:
            acc.set_references(references)
        message = self.reducer.broadcast(self.round)
        for cid in chosen[self.rank :: self.world_size]:
            indices = self.data.client_indices[cid]
            parts = self.client_pass(cid, message, derive_seed(self.seed, tag, cid),
                                     lambda ctx: body(ctx, indices))  # noqa: B023 (runs before the next client)
            acc.add_([p.detach().reshape(-1) if p is not None else None for p in parts])
        return list(torch.split(acc.all_reduce(self.comm), list(sizes)))

    def sync_clients(self, clients: list[int], mine: list[int]) -> None:
        """After a client pass over ``clients`` (``mine`` on this rank): every rank sees every client's state."""
        self.store.sync(self.comm, clients, mine)
        if self.client_state_mode == "disk":
            self.comm.barrier()  # other ranks read the client files written by this one

    def train_client(self, client_id: int, message: ServerMessage) -> tuple[dict[str, Tensor], int]:
        """Local fit of one client; folds its update into the reducer and saves its persistent state."""
        def fit(ctx: ClientContext) -> tuple[dict[str, Tensor], int]:
            self.method.on_client_start(ctx)
            sums, steps = self.trainer.fit(self.method, ctx, self.data.client_indices[client_id])
            failpoint("client.end")
            self.reducer.accumulate(self.method.on_client_end(ctx))
            return sums, steps

        return self.client_pass(client_id, message, self.client_seed_fn(self.seed, message.round, client_id), fit)

    # -- one round -----------------------------------------------------------------------------------------
    def run_round(self, round: int) -> RoundResult:
        """Runs round ``round`` (1-based) on this rank; every rank ends with the same global state."""
        t0 = time.perf_counter()
        message = self.reducer.broadcast(round)
        sampler = self.method.cohort_sampler() or self.cohort_sampler
        cohort = list(sampler(self.seed, round, self.data.num_clients, self.clients_per_round))
        mine = assign_to_ranks(cohort, self._sizes, self.world_size)[self.rank]
        self.reducer.begin_round(round)
        self.store.begin_round(round)
        self.method.begin_round(round)
        client_sums: list[dict[str, Tensor]] = []
        total_steps = 0
        self.model.train()
        results = self._vectorized.train(mine, message) if self._vectorized is not None else (
            self.train_client(cid, message) for cid in mine)
        for sums, steps in results:
            total_steps += steps
            client_sums.append(sums)
        # Agree on the loss (and on a non-finite one) across ranks before touching the global state.
        metrics = self._train_metrics(client_sums, total_steps, cohort, mine)
        try:
            self.reducer.reduce(self.comm)
        except ExactSumOverflow as err:
            raise NonFiniteLossError(f"round {round}: {err}") from None
        self.reducer.server_step(round)
        if self.method.runs_after_aggregation:
            self._after_aggregation(round, mine)
        self.sync_clients(cohort, mine)
        self.round = round
        metrics.update(self.method.round_metrics(round))
        metrics["time/round_s"] = time.perf_counter() - t0
        return RoundResult(round=round, cohort=cohort, metrics=metrics)

    def _after_aggregation(self, round: int, mine: list[int]) -> None:
        """The second client pass of a round (e.g. FedPuReL's interleaved Stage 2): every client of this rank's
        cohort loads the *new* global state and its personal state, runs :meth:`FedMethod.after_aggregation`, and
        its persistent state is saved again. Nothing is uploaded; the generator stream differs from the first pass.
        """
        message = self.reducer.broadcast(round)
        self.model.train()
        for cid in mine:
            indices = self.data.client_indices[cid]
            self.client_pass(cid, message, self.client_seed_fn(self.seed, round, cid) ^ _SECOND_PASS,
                             functools.partial(self.method.after_aggregation, indices=indices))

    def _train_metrics(self, client_sums: list[dict[str, Tensor]], steps: int, cohort: list[int],
                       mine: list[int]) -> dict[str, float]:
        """Mean loss parts over all steps of all clients of the round (one tiny exact all-reduce across ranks).

        The part names are agreed across ranks (a rank without clients does not know them) and cached; a rank
        that sees an uncached name raises a flag inside the same all-reduce, and only then do the ranks exchange
        names and reduce again. Each client's sums are one exact term, so the mean is the same bitwise for any
        number of ranks.

        Raises:
            NonFiniteLossError: on every rank, when any client's loss was NaN or infinite (the first such client
                of the cohort in client-id order is named).
        """
        local_names = sorted({k for sums in client_sums for k in sums})
        names = self._loss_names if self.comm.distributed else local_names
        values, flags = self._reduce_losses(names, local_names, client_sums, steps, cohort, mine)
        if values[-2] > 0:  # some rank has a part name the others do not know yet
            names = self._loss_names = sorted(set(names).union(*self.comm.all_gather_object(local_names)))
            values, flags = self._reduce_losses(names, local_names, client_sums, steps, cohort, mine)
        culprits = sorted(cid for cid, f in zip(cohort, flags) if f > 0)
        if culprits:
            more = f" and {len(culprits) - 1} more" if len(culprits) > 1 else ""
            raise NonFiniteLossError(
                f"non-finite training loss in round {self.round + 1} (client {culprits[0]}{more} of the cohort); "
                "the run stopped before the round changed the global model. Lower the learning rate or set "
                "method.init_args.grad_clip."
            )
        n = max(values[-1], 1.0)
        sums = dict(zip(names, values))
        # Loss parts: the mean over all steps; logged values (``FedMethod.log``, keys with a prefix): the mean over
        # the steps that logged them.
        return {(k if "/" in k else part_metric(k)): v / (max(sums.get(k + COUNT, 0.0), 1.0) if "/" in k else n)
                for k, v in sums.items() if not k.endswith(COUNT)}

    def _reduce_losses(self, names: list[str], local_names: list[str], client_sums: list[dict[str, Tensor]],
                       steps: int, cohort: list[int], mine: list[int]) -> tuple[list[float], list[float]]:
        """One exact sum all-reduce of [loss parts..., unknown-name flag, steps, non-finite flag per cohort
        position]: a row per client of this rank (its loss parts and its flag) plus one row of counts."""
        width = len(names) + 2 + len(cohort)
        rows = [[0.0] * width for _ in range(len(client_sums) + 1)]
        values = [(r, k, v) for r, sums in enumerate(client_sums) for k, v in sums.items()]
        if values:  # one device-to-host copy per round, not per client; the rows are built on the host
            column = {k: i for i, k in enumerate(names)}
            position = {cid: i for i, cid in enumerate(cohort)}
            flat = torch.stack([v.detach().reshape(()) for _, _, v in values]).double().tolist()
            for (r, k, _), v in zip(values, flat):
                if not math.isfinite(v):
                    rows[r][len(names) + 2 + position[mine[r]]] = 1.0  # the non-finite flag; the value counts 0
                elif k in column:
                    rows[r][column[k]] = v
        rows[-1][len(names)] = len(set(local_names) - set(names))
        rows[-1][len(names) + 1] = steps
        out = sum_host_rows(rows, self.comm, self.device)
        return out[: len(names) + 2], out[len(names) + 2:]

    def should_evaluate(self, round: int) -> bool:
        """Evaluate every ``eval_every`` rounds and after the last one."""
        return self.eval_every > 0 and (round % self.eval_every == 0 or round == self.rounds)

    def evaluate(self) -> dict[str, float]:
        """GM on the global test set and PM on every client's local test set (sharded, synced)."""
        return self.evaluator.run()

    def preempted(self, flag: bool) -> bool:
        """Agree across ranks whether a preemption signal arrived."""
        return self.comm.any(flag)

    # -- checkpoint state ----------------------------------------------------------------------------------
    def state_dict(self, client_states: bool = True) -> dict[str, Any]:
        """The full simulation state after the last completed round (``client_states=False``: without the memory /
        cpu store's client states, which checkpoints write through ``ClientJournal``)."""
        store = self.store.state_dict() if client_states or self.store.mode == "disk" else {"mode": self.store.mode}
        return {
            "round": self.round,
            "reducer": self.reducer.state_dict(),
            "method": self.method.server_state_dict(),
            "store": store,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.reducer.load_state_dict(state["reducer"])
        self.method.load_server_state_dict(state["method"])
        self.store.load_state_dict(state["store"])
        self.store.begin_round(self.round)  # disk: reads see the versions of rounds <= the checkpoint's
