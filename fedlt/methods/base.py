"""The method contract (docs/architecture.md section 4): a client half (LightningModule-style hooks) and a server half
(a :class:`Reducer`). Concrete methods subclass :class:`FedMethod` (usually through ``FedAvg``) and override only
what differs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import torch
from torch import Tensor, nn

from fedlt.engine.collectives import all_reduce_sum_
from fedlt.engine.comm import RunInfo
from fedlt.engine.exact import ExactSum, magnitudes
from fedlt.engine.params import FlatLayout, copy_tensors_
from fedlt.errors import ConfigError
from fedlt.losses import CrossEntropy, Loss
from fedlt.registry import Registry
from fedlt.schedules import Schedule
from fedlt.types import ClientContext, ClientUpdate, PaperRef, ServerMessage, StepOutput

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer
    from fedlt.models.base import FedModel

METHODS: Registry[type[FedMethod]] = Registry("method")

_WEIGHT = "__weight__"
_STAGING_BYTES = 32 << 20  # exact sums stage client terms in up to 32 MiB of float64 rows (see ExactSum)
_M = TypeVar("_M", bound=nn.Module)


def _after_reduce(step: Any) -> Any:
    """Wraps a ``server_step``: with exact sums the buffer holds nothing until :meth:`Reducer.reduce` ran."""
    @functools.wraps(step)
    def server_step(self: Reducer, round: int) -> None:
        if self._unreduced:
            raise RuntimeError(f"{type(self).__name__}.server_step before reduce(): the accumulated sums reach the "
                               "buffer in reduce(fabric) (reduce(None) in a single process)")
        return step(self, round)
    return server_step


def submodule(model: nn.Module, name: str, kind: type[_M]) -> _M:
    """``model.<name>``, checked to be a ``kind``: typed access to a submodule whose class the method knows (a head it
    checked or replaced in ``setup``, a module it added to the model there)."""
    module = getattr(model, name)
    if not isinstance(module, kind):
        raise TypeError(f"model.{name} is a {type(module).__name__}, expected a {kind.__name__}")
    return module


class Reducer:
    """Server half: streaming weighted accumulation, one sum all-reduce, deterministic server step.

    The default is FedAvg's weighted mean ``theta = sum_k n_k theta_k / sum_k n_k`` over the shared tensors.
    Subclasses override :meth:`server_step` (server optimizers, prototype averaging, ...).

    With :attr:`exact` (the default) the sums are exact and order-independent (:mod:`fedlt.engine.exact`): the
    reduced buffer, and so the server step, is bitwise the same for any number of ranks and any split of the
    cohort over them. Subclasses must then add to the sums only through :meth:`accumulate`; a reducer whose
    accumulation writes the buffer directly sets ``exact = False`` (its buffer is then float-summed over ranks,
    which is exact only for contributions that are disjoint, one client per element).

    Args:
        extras: names and shapes of the extra tensors clients upload (summed across clients, unweighted).
    """

    exact: bool = True
    _unreduced = False  # exact terms accumulated but not yet reduced into the buffer

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "server_step" in cls.__dict__:  # wraps the subclass's own method on purpose (as Reducer's, below)
            cls.server_step = _after_reduce(cls.__dict__["server_step"])  # type: ignore[method-assign]

    def __init__(self, extras: dict[str, tuple[int, ...]] | None = None) -> None:
        self.extra_shapes = dict(extras or {})
        self.global_state: dict[str, Tensor] = {}

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        """Adopts ``global_state`` (the shared tensors, owned by the reducer from now on)."""
        self.global_state = global_state
        self.float_keys = [k for k, v in global_state.items() if v.is_floating_point()]
        self.other_keys = [k for k, v in global_state.items() if not v.is_floating_point()]
        shapes: dict[str, Any] = {k: global_state[k].shape for k in self.float_keys + self.other_keys}
        shapes.update({f"extra.{k}": s for k, s in self.extra_shapes.items()})
        shapes[_WEIGHT] = (1,)
        self.layout = FlatLayout.of(shapes)
        self.buffer = torch.zeros(self.layout.numel, device=device)
        views = self.layout.views(self.buffer)
        self.acc_float = [views[k] for k in self.float_keys]
        self.acc_other = [views[k] for k in self.other_keys]
        self.acc = {k: views[k] for k in self.float_keys + self.other_keys}
        self.extras_sum = {k: views[f"extra.{k}"] for k in self.extra_shapes}
        self.weight_sum = views[_WEIGHT]
        self.global_float = [global_state[k] for k in self.float_keys]
        self._model_keys = self.float_keys + self.other_keys
        self._exact_sum = ExactSum([views[n].numel() for n in self.layout.names], device, staging_bytes=_STAGING_BYTES)
        self._exact_names = list(self.layout.names)
        assert self._exact_names == [*self._model_keys, *(f"extra.{k}" for k in self.extra_shapes), _WEIGHT]
        self._one = self.weight_sum.new_ones(1)  # the weight segment's term (times the client's weight)
        self._extra_ones = [1.0] * len(self.extra_shapes)  # extras are summed unweighted

    def begin_round(self, round: int) -> None:
        """Zeroes the accumulator; the exact grid of each shared tensor follows its current magnitude."""
        self.buffer.zero_()
        if self.exact:
            refs = dict(zip(self._model_keys, magnitudes([self.global_state[k] for k in self._model_keys])))
            self._exact_sum.set_references([refs.get(n, 1.0) for n in self._exact_names])
            self._exact_sum.zero_()
        self._unreduced = False

    def accumulate(self, update: ClientUpdate) -> None:
        """Adds ``weight * tensors`` (and the extras) of one client to the running sums."""
        w = float(update.weight)
        if self.exact:
            tensors, extras = update.tensors, update.extras
            terms = [tensors.get(k) for k in self._model_keys] + [extras.get(k) for k in self.extra_shapes]
            self._exact_sum.add_([*terms, self._one], [w] * len(self._model_keys) + self._extra_ones + [w])
            self._unreduced = True
            return
        with torch.no_grad():
            if self.float_keys:
                torch._foreach_add_(self.acc_float, [update.tensors[k] for k in self.float_keys], alpha=w)
            for acc, k in zip(self.acc_other, self.other_keys):
                acc.add_(update.tensors[k].to(acc.dtype), alpha=w)
            for k, t in update.extras.items():
                self.extras_sum[k].add_(t.to(self.buffer.dtype))
            self.weight_sum.add_(w)

    def accumulate_stacked(self, weights: Tensor, tensors: dict[str, Tensor]) -> None:
        """:meth:`accumulate` for many clients at once (vectorized cohorts): ``tensors[key]`` stacks the clients'
        values along dim 0 and ``weights`` (n,) their weights; no extras. The exact sums get the same terms as n
        calls of :meth:`accumulate` (each ``w * x`` rounded once to float64, then onto the grid), so the result is
        bitwise the same."""
        if not self.exact:
            with torch.no_grad():
                for k, acc in self.acc.items():
                    w = weights.to(tensors[k].device, torch.float64).view(-1, *([1] * (tensors[k].dim() - 1)))
                    acc.add_((tensors[k].to(torch.float64) * w).sum(0).to(acc.dtype))
                self.weight_sum.add_(float(weights.sum()))
            return
        ws = [float(v) for v in weights.tolist()]
        blocks = [tensors[k].detach() for k in self._model_keys] + [None] * len(self.extra_shapes)  # no extras
        ones = self._one.expand(len(ws), 1)
        self._exact_sum.add_stacked_([*blocks, ones],
                                     [[w] * len(self._model_keys) + self._extra_ones + [w] for w in ws])
        self._unreduced = True

    def reduce(self, fabric: Any) -> None:
        """One sum all-reduce of the whole accumulator (idle ranks contribute zeros)."""
        if self.exact:
            self._exact_sum.all_reduce(fabric, out=self.buffer)
            self._unreduced = False
        else:
            all_reduce_sum_(fabric, self.buffer)

    def weighted_mean(self) -> dict[str, Tensor] | None:
        """The weighted mean of the uploaded tensors (``None`` when no client trained)."""
        total = float(self.weight_sum.item())
        if total <= 0:
            return None
        return {k: v / total for k, v in self.acc.items()}

    def server_step(self, round: int) -> None:
        """FedAvg: the global state becomes the weighted mean (integer buffers are rounded)."""
        mean = self.weighted_mean()
        if mean is None:
            return
        with torch.no_grad():
            copy_tensors_(self.global_float, [mean[k] for k in self.float_keys])
            for k in self.other_keys:
                self.global_state[k].copy_(mean[k].round().to(self.global_state[k].dtype))

    def broadcast(self, round: int) -> ServerMessage:
        """The message of ``round``: the shared global tensors plus :meth:`broadcast_extras`."""
        return ServerMessage(round=round, state=self.global_state, extras=self.broadcast_extras(round))

    def broadcast_extras(self, round: int) -> dict[str, Any]:
        """Method-specific payloads sent with the global state."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the server (global tensors and server-optimizer state)."""
        return {"global": {k: v.detach().cpu().clone() for k, v in self.global_state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in state["global"].items():
                self.global_state[k].copy_(v)


Reducer.server_step = _after_reduce(Reducer.server_step)  # type: ignore[method-assign]


class FedMethod:
    """Base of all methods: local SGD on cross-entropy, FedAvg aggregation, no personal state.

    Subclasses set ``paper``, may set ``personal_prefixes`` (state-dict key prefixes that are kept per client
    and never aggregated) and override hooks.

    Args:
        lr: local learning rate (eta).
        momentum: local SGD momentum (a fresh optimizer every round: momentum never crosses rounds).
        weight_decay: local L2 weight decay.
        local_epochs: local epochs E per round.
        local_steps: if set, exactly this many local mini-batch steps per round instead of ``local_epochs``.
        batch_size: local mini-batch size B.
        grad_clip: clip the global gradient L2 norm to this value (``None``: no clipping).
        loss: the local classification loss (default cross-entropy); long-tail losses calibrate to the
            client's local label histogram.
        lr_schedule: the local learning rate per round, ``lr * lr_schedule.factor(round, rounds)``
            (:mod:`fedlt.schedules`: ``Exponential``, ``Step``, ``MultiStep``, ``Cosine``, ``Warmup``); every
            local-training optimizer and update rule of the method uses it (:attr:`current_lr`). ``None``: constant.
        local_lr_schedule: a schedule within each client's local training, over its local steps of the round
            (``factor(step, steps)`` times the round's rate; fresh for every client). ``None``: constant.
    """

    paper: ClassVar[PaperRef | None] = None
    # Set by the class, or per instance (a user's LightningModule's own setting, :class:`LightningClient`).
    automatic_optimization: bool = True
    # Whether the cohort's clients run a second pass after the server step of every round
    # (:meth:`after_aggregation`, e.g. FedPuReL's interleaved Stage 2); a class or instance setting.
    runs_after_aggregation: bool = False
    # Whether the method only works on a CLIP model (``clip:<name>``, :class:`fedlt.models.clip.ClipModel`).
    needs_clip: ClassVar[bool] = False
    # Whether the method trains anything (False: no optimizer step, no training loss, the global state never
    # changes -- e.g. zero-shot CLIP; the contract suite then checks only its evaluation).
    trains: ClassVar[bool] = True
    personal_prefixes: ClassVar[tuple[str, ...]] = ()
    # Whether the method's client step is the plain loss, so that a user's LightningModule (model.class_path) can
    # supply it (its training_step and configure_optimizers; fedlt.methods._lightning). Declared by the class
    # body itself, never inherited, like ``vectorizable``.
    lightning_client: ClassVar[bool] = False
    lightning: Any = None  # the LightningClient driving a user's LightningModule (set in ``setup``)
    # Whether a global model exists for GM evaluation; a method may also set it per instance in ``setup``
    # when it depends on the model (FedBN without BatchNorm layers is FedAvg).
    has_global_model: bool = True
    # The run this method is part of (seed, rounds, ranks), set by the Simulator before ``setup``: every
    # server-side random draw derives from ``run.seed`` through ``fedlt.engine.sharding.seeded_generator``.
    run: RunInfo = RunInfo()
    # Set by ``setup``: the workspace model (a FedModel: ``forward_features`` and ``head``), the data and the trainer.
    model: FedModel
    num_classes: int  # C, the data's
    data: Any
    trainer: LocalTrainer
    # Set by the engine after ``setup``: the model state-dict keys kept per client (``is_personal``).
    personal_keys: tuple[str, ...] = ()
    # Where the authors' released code (the code behind the paper's tables) does something other than the paper
    # describes: the constructor arguments that select the code's behaviour, with the code's values. The defaults
    # follow the paper; ``configs/paper/`` files set these values. One named argument per difference; the table
    # in docs/paper_vs_code.md lists them all (a test keeps the two in step).
    released_code: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        local_epochs: int = 1,
        local_steps: int | None = None,
        batch_size: int = 32,
        grad_clip: float | None = None,
        loss: Loss | None = None,
        lr_schedule: Schedule | None = None,
        local_lr_schedule: Schedule | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if batch_size < 1 or local_epochs < 0:
            raise ValueError("batch_size must be >= 1 and local_epochs >= 0")
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.grad_clip = grad_clip
        self.loss = loss if loss is not None else CrossEntropy()
        self.lr_schedule = lr_schedule
        self.local_lr_schedule = local_lr_schedule
        self._lr_round = 1
        self.prog_bar_metrics: set[str] = set()  # train metrics the progress bar shows: self.log(..., prog_bar=True)
        self._local_factor = 1.0  # the local schedule's factor at the current local step (set by the LocalTrainer)
        self._optimizers: list[torch.optim.Optimizer] = []

    # -- wiring ----------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The registry key (lowercase module name)."""
        return type(self).__module__.rsplit(".", 1)[-1]

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        """Called once per rank with the workspace model (already on the device).

        Methods that add modules (extra heads, projections) add them to ``model`` here, before the engine splits
        the state into shared and personal keys. After it returns, the engine sets ``self.shared_tensors``: the
        workspace's aggregated tensors by state-dict key (live references, not copies).

        Args:
            model: the workspace model (one per rank).
            data: the federated dataset (``num_classes``, ``class_counts``, ``client_class_counts``, ...).
            trainer: the local trainer (``autocast``, ``backward``, ``step``, ``batch_indices``).
        """
        from fedlt.models.custom import UserModel

        self.model = cast("FedModel", model)  # the engine's workspace model is a FedModel (docs/architecture.md 2)
        self.data = data
        self.num_classes = data.num_classes
        self.trainer = trainer
        self.shared_tensors: dict[str, Tensor] = {}
        if isinstance(model, UserModel) and model.lightning_module is not None:  # a user's LightningModule
            from fedlt.methods._lightning import LightningClient

            self.lightning = LightningClient(self, model)
        else:
            self.lightning = None

    def begin_round(self, round: int) -> None:
        """Called by the engine on every rank before round ``round``'s client passes (default: sets the round of
        :attr:`current_lr`). Overrides call ``super().begin_round(round)``."""
        self._lr_round = int(round)

    def round_lr(self, round: int) -> float:
        """The local learning rate of ``round``: ``lr`` times ``lr_schedule``'s factor (``lr`` without one)."""
        if self.lr_schedule is None:
            return float(self.lr)
        return self.lr_schedule(self.lr, round, self.run.rounds)

    @property
    def current_lr(self) -> float:
        """The local learning rate in effect: the round's rate (:meth:`round_lr`) times, during local training,
        ``local_lr_schedule``'s factor at the current step. Optimizers built in :meth:`configure_optimizers` start
        from it and the local trainer follows the local schedule; update rules written by hand use it directly
        (the base ``lr`` stays the configured value)."""
        return self.round_lr(self._lr_round) * self._local_factor

    def round_metrics(self, round: int) -> dict[str, float]:
        """Values the same on every rank to log with the round's train metrics (default: ``train/lr`` when the
        local learning rate is scheduled)."""
        return {"train/lr": self.round_lr(round)} if self.lr_schedule is not None else {}

    def is_personal(self, key: str) -> bool:
        """Whether a model state-dict key stays on the client (never aggregated)."""
        return key.startswith(self.personal_prefixes) if self.personal_prefixes else False

    def client_state_template(self) -> dict[str, Tensor]:
        """Non-model tensors kept per client, with their shapes and dtypes (default: none)."""
        return {}

    @property
    def personalizes(self) -> bool:
        """Whether PM differs from GM. By default: when some model keys are personal (the engine records them in
        ``personal_keys`` at setup). Methods whose personal *non-model* state changes PM override this."""
        return bool(self.personal_keys) or bool(self.personal_prefixes)

    # -- Lightning's client API (during a client's local fit) ---------------------------------------------------
    def log(self, name: str, value: Tensor | float, prog_bar: bool = False, logger: bool = True,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: str = "mean",
            sync_dist: bool = False, batch_size: int | None = None) -> None:
        """Logs a scalar from ``training_step`` (as ``LightningModule.log``): the round's train metrics get
        ``train/<name>`` (a name with a ``/`` is kept as it is), the mean over every step of the round's clients
        that logged it, reduced exactly across clients and ranks, and it reaches ``metrics.csv`` and W&B with the
        loss (``prog_bar=True``: the progress bar too). Lightning's other arguments are accepted; only
        ``reduce_fx="mean"`` exists (values are always synchronised across ranks, once per round);
        ``logger=False`` drops the value."""
        if reduce_fx not in ("mean", torch.mean):
            raise ConfigError(f"log({name!r}): reduce_fx={reduce_fx!r}; fedlt reduces logged values by their mean "
                             "over the round's local steps")
        if logger:
            self.trainer.log(name, value)
            if prog_bar:
                from fedlt.engine.local_loop import metric_name

                self.prog_bar_metrics.add(metric_name(name))

    def log_dict(self, dictionary: dict[str, Tensor | float], **kwargs: Any) -> None:
        """:meth:`log` for every entry of ``dictionary``."""
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)

    def optimizers(self) -> Any:
        """The optimizers of the current local fit, as ``configure_optimizers`` returned them (one, or a list):
        :class:`~fedlt.engine.local_loop.ClientOptimizer` wrappers whose ``step()`` applies the precision's
        gradient unscaling and ``grad_clip`` (manual optimization: ``opt.zero_grad()``, ``self.manual_backward``,
        ``opt.step()``)."""
        opts = self.trainer.optimizers
        if not opts:
            raise RuntimeError("optimizers(): available during a client's local training only")
        return opts[0] if len(opts) == 1 else list(opts)

    def lr_schedulers(self) -> Any:
        """The learning-rate schedulers ``configure_optimizers`` returned for the current local fit (one, a list,
        or ``None``); with manual optimization the method steps them."""
        scheds = [c.scheduler for c in self.trainer.schedulers]
        if not scheds:
            return None
        return scheds[0] if len(scheds) == 1 else scheds

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward()`` with the precision's gradient scaling (manual optimization)."""
        self.trainer.backward(loss, *args, **kwargs)

    # -- client half -----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The local optimizer(s), fresh for every client: any of Lightning's forms (an optimizer, a list, a dict
        with ``optimizer`` and ``lr_scheduler``, a list of such dicts, or two lists ``(optimizers, schedulers)``).
        A scheduler steps every local epoch (``interval: step``: every optimizer step) of the client's fit.
        With a user's LightningModule, its own ``configure_optimizers``."""
        if self.lightning is not None:
            return self.lightning.configure_optimizers()
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [torch.optim.SGD(params, lr=self.current_lr, momentum=self.momentum, weight_decay=self.weight_decay)]

    def on_client_start(self, ctx: ClientContext) -> None:
        """Per-client setup after the global and personal state are loaded."""

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        """The configured loss (default cross-entropy) on the mini-batch; with a user's LightningModule, its own
        ``training_step``."""
        if self.lightning is not None:
            return self.lightning.training_step(batch, ctx)
        x, y = batch[0], batch[1]
        loss = self.loss(self.model(x), y, ctx.class_counts, ctx.round)
        return StepOutput(loss=loss, parts={"loss": loss.detach()})

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        """Uploads the shared model tensors (aliases of the workspace), weighted by the local sample count."""
        return ClientUpdate(client_id=ctx.client_id, weight=float(ctx.num_samples), tensors=self.shared_tensors)

    def after_aggregation(self, ctx: ClientContext, indices: Tensor) -> None:
        """Second client pass of a round, run when ``runs_after_aggregation`` is set: the workspace holds the round's
        new global state and the client's personal state; changes to personal model tensors and ``ctx.state`` are
        stored, nothing is uploaded. ``indices`` are the client's training indices (``self.trainer.batch_indices``
        and ``self.trainer.run`` cut and run the batches)."""

    def cohort_sampler(self) -> Any:
        """A replacement for the engine's uniform cohort sampler, or ``None`` (default). Signature
        ``(seed, round, num_clients, clients_per_round) -> client ids``; it must depend on its arguments only (the
        same on every rank), e.g. FedPuReL's full participation in the first round."""
        return None

    # -- inference -------------------------------------------------------------------------------------------
    def predict_global(self, x: Tensor) -> Tensor:
        """GM logits (the workspace holds the global state)."""
        return self.model(x)

    def prepare_personal(self, client_id: int) -> None:
        """Called by the evaluator after the client's state is loaded and before :meth:`predict_personal`
        (e.g. FedBABU fine-tunes the head on the client's data here; changes are never stored)."""

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        """PM logits (the workspace holds the global state plus the client's personal state)."""
        return self.model(x)

    # -- vectorized cohorts (fedlt.engine.vectorized) ---------------------------------------------------------
    # A method trains with ``trainer.vectorize_cohort`` only when its own class body sets ``vectorizable = True``
    # (never inherited: a subclass that changes the local step must declare it again): the default training step
    # (``loss(model(x), y, class counts, round)``), one SGD optimizer over the trainable parameters, no client
    # hooks, plus :meth:`vectorized_penalty`.
    vectorizable: ClassVar[bool] = False

    def vectorized_penalty(self, params: dict[str, Tensor],
                           global_params: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]] | None:
        """A term added to the loss of a vectorized step, as a function of one client's trainable parameters and the
        broadcast global ones (e.g. FedProx's proximal term), with the loss parts to log; ``None``: none."""
        return None

    # -- batched PM evaluation -------------------------------------------------------------------------------
    @property
    def pm_shares_features(self) -> bool:
        """Whether every client's PM logits are ``pm_logits(pm_features(x), k)`` with features that do not depend
        on the client (a personal head on the shared body).

        The evaluator then computes the features of the test images once per evaluation, with the global state,
        and applies each client's personal head to its rows (after ``Simulator.load_personal``), instead of running
        every client's whole model on its own small batches. Default: true when every personal model key is a
        classifier key (``head.``), the model is a plain ``head(forward_features(x))`` and the method keeps the
        default ``prepare_personal`` and ``predict_personal``. A method that overrides those and still has this
        structure declares it by overriding this property (and :meth:`pm_logits`).
        """
        from fedlt.models.base import FedModel

        cls = type(self)
        keys = self.personal_keys
        model = getattr(self, "model", None)
        return (bool(keys) and all(k.startswith("head.") for k in keys)
                and cls.predict_personal is FedMethod.predict_personal
                and cls.prepare_personal is FedMethod.prepare_personal
                and isinstance(model, FedModel) and type(model).forward is FedModel.forward)

    def pm_features(self, x: Tensor) -> Tensor:
        """The shared features of a test batch for :meth:`pm_logits` (the workspace holds the global state)."""
        return self.model.forward_features(x)

    def pm_logits(self, features: Tensor, client_id: int) -> Tensor:
        """PM logits from :meth:`pm_features` (the workspace holds the client's personal state on top of the
        global state); equals ``predict_personal`` on the same images."""
        return self.model.head(features)

    # -- server half -----------------------------------------------------------------------------------------
    def configure_reducer(self) -> Reducer:
        """The server half used by this method."""
        return Reducer()

    def on_fit_end(self, simulator: Any) -> bool | None:
        """Post-training stages (realignment, classifier re-training, ...). Return ``True`` when the stage changed
        what GM/PM predict: the experiment then evaluates once more and stores it under ``post_training``."""
        return None

    def server_state_dict(self) -> dict[str, Any]:
        """Method-owned state to checkpoint besides the reducer (default: none)."""
        return {}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`server_state_dict`."""
