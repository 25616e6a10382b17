"""Builds a run from its (instantiated) config and drives ``fit`` / ``validate`` / ``partition``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedlt.callbacks.progress import ProgressBar
from fedlt.callbacks.report import final_report, format_table
from fedlt.config import LoggingConfig, ModelConfig, TrainerConfig
from fedlt.engine.checkpoint import (
    CKPT_DIR,
    CLIENTS_DIR,
    ClientJournal,
    PreemptionFlag,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_atomic,
)
from fedlt.engine.comm import Comm
from fedlt.engine.faults import failpoint
from fedlt.engine.hardware import Hardware, HardwareError, resolve_hardware
from fedlt.engine.local_loop import NonFiniteLossError
from fedlt.engine.rundir import (
    RESUME_ALLOWED,
    RunDirBusy,
    RunDirLock,
    config_changes,
    format_changes,
    remove_stale_temporaries,
)
from fedlt.errors import ConfigError, UserError
from fedlt.methods.base import FedMethod
from fedlt.models import build_model
from fedlt.provenance import append_resume, environment_record, write_environment

if TYPE_CHECKING:
    from fedlt.engine.simulator import Simulator


class Experiment:
    """One configured run.

    Args:
        data: the federated dataset.
        method: the federated method.
        model: the backbone.
        trainer: round loop and hardware settings.
        logging: W&B and progress settings.
        seed: experiment seed (model init, partitions, cohorts, client generators).
        name: run name.
        run_dir: run directory (default ``runs/<name>``).
        resume: ``None`` (fresh run), ``auto`` (latest checkpoint of ``run_dir`` if any) or a checkpoint path.
        config_yaml: the resolved config, written to the run directory and logged.
    """

    def __init__(self, data: Any, method: FedMethod, model: ModelConfig, trainer: TrainerConfig,
                 logging: LoggingConfig, seed: int = 0, name: str = "run", run_dir: str | None = None,
                 resume: str | None = None, config_yaml: str = "") -> None:
        self.data = data
        if getattr(data, "seed", 0) is None:
            data.seed = seed  # the split follows the experiment seed unless the config pins it
        self.method = method
        self.model_cfg = model
        self.trainer_cfg = trainer
        self.logging_cfg = logging
        self.seed = seed
        self.name = name
        self.run_dir = Path(run_dir or os.path.join("runs", name))
        self.resume = resume
        self.config_yaml = config_yaml
        self.fabric: Any = None

    # -- building ------------------------------------------------------------------------------------------
    def resolve_hardware(self) -> Hardware:
        """Resolves ``auto`` accelerator, devices and precision (:mod:`fedlt.engine.hardware`) into
        ``trainer_cfg`` and the recorded config, so that ``config.yaml``, the resume guard and the report see what
        the run used. Missing hardware is a :class:`UserError`, raised before anything is spawned or written."""
        t = self.trainer_cfg
        # Vectorized cohorts train in float32 only: there ``auto`` precision means 32-true on a GPU too.
        precision = "32-true" if t.vectorize_cohort and t.precision == "auto" else t.precision
        try:
            hw = resolve_hardware(t.accelerator, t.devices, t.num_nodes, precision)
        except HardwareError as err:
            raise UserError(str(err)) from None
        resolved = {"accelerator": hw.accelerator, "devices": hw.devices, "precision": hw.precision}
        if any(getattr(t, k) != v for k, v in resolved.items()):
            for k, v in resolved.items():
                setattr(t, k, v)
            self.config_yaml = _with_trainer_values(self.config_yaml, resolved)
        self.hardware = hw
        return hw

    def launch(self) -> Any:
        """Creates and launches Lightning Fabric (spawns the DDP processes when ``devices``/``num_nodes`` > 1)."""
        from lightning.fabric import Fabric

        hw = self.resolve_hardware()
        strategy = "ddp" if hw.world_size > 1 else "auto"
        self.fabric = Fabric(accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes,
                             strategy=strategy, precision=hw.precision)
        self.fabric.launch()
        return self.fabric

    def build_simulator(self) -> Simulator:
        """Sets the data up on the device, builds the model from the seed and wires the simulator.

        Building is where settings meet: a ``ValueError`` raised while the data, the model or the method is set up
        is a setting or combination of settings that cannot work, and becomes a :class:`ConfigError` (exit
        status 2); a ``ValueError`` later, in training, is a bug and keeps its traceback."""
        from fedlt.engine.simulator import Simulator  # the evaluator's torchmetrics: not on the CLI's help paths
        from fedlt.engine.vectorized import VectorizationError

        try:
            self.data.setup(self.comm.device)
            torch.manual_seed(self.seed)
            model = self._build_model()
            t = self.trainer_cfg
            sim = Simulator(self.fabric, self.data, model, self.method, rounds=t.rounds,
                            clients_per_round=t.clients_per_round, eval_every=t.eval_every, seed=self.seed,
                            client_state=t.client_state, run_dir=self.run_dir, eval_batch_size=t.eval_batch_size,
                            precision=t.precision, exact_reduction=t.exact_reduction,
                            vectorize_cohort=t.vectorize_cohort)
            return sim.setup()
        except VectorizationError as err:  # an unsupported method or model for trainer.vectorize_cohort
            raise UserError(str(err)) from None
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def _build_model(self) -> Any:
        """The configured backbone: a registered short form or the user's ``class_path`` module."""
        m, d = self.model_cfg, self.data
        if m.class_path is not None:
            from fedlt.models.custom import build_user_model

            return build_user_model(m.class_path, m.init_args, m.head, num_classes=d.num_classes,
                                    in_channels=d.in_channels, image_size=d.image_size)
        return build_model(m.name, num_classes=d.num_classes, in_channels=d.in_channels, image_size=d.image_size,
                           pretrained=m.pretrained, class_names=list(d.class_names), dataset=d.source_name,
                           **m.kwargs)

    @property
    def is_rank_zero(self) -> bool:
        return self.comm.is_rank_zero

    @property
    def comm(self) -> Comm:
        """The ranks of this run (a single process before :meth:`launch` or without Fabric)."""
        return Comm(self.fabric)

    def _print(self, text: str) -> None:
        if self.is_rank_zero:
            print(text, flush=True)

    # -- fit -----------------------------------------------------------------------------------------------
    def _resume_checkpoint(self) -> Path | None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"run directory {self.run_dir} exists and is not a directory; pick another --run_dir "
                            "(or --name)")
        latest = latest_checkpoint(self.run_dir)
        if self.resume is None:
            if latest is not None:
                raise UserError(
                    f"run directory {self.run_dir} already holds checkpoints (latest: {latest.name}); refusing to "
                    "overwrite them. Continue it with --resume auto, or pick another --name / --run_dir."
                )
            return None
        if self.resume == "auto":
            return latest
        path = Path(self.resume)
        if not path.is_file():
            raise UserError(f"--resume {self.resume}: no such checkpoint file")
        return path

    def fit(self) -> dict[str, Any]:
        """Trains for ``trainer.rounds`` rounds (resuming when asked) and returns the final report.

        Everything is validated (config, data, model, checkpoint and its config) before the run directory is
        touched; then rank 0 takes the run directory's lock, removes stale temporary files and writes the run
        files (a fresh run) or appends to the resume log (a resume)."""
        # SIGTERM/SIGUSR1 from here on end with exit status 3 (so SLURM requeues): before round 1 at once, with
        # nothing to checkpoint; later at the next round boundary. The handlers live exactly as long as fit.
        flag = PreemptionFlag().install()
        try:
            self.resolve_hardware()  # the recorded config holds the resolved values: the resume guard compares them
            ckpt_file = self._resume_checkpoint()
            ckpt = self._read_resume_checkpoint(ckpt_file) if ckpt_file is not None else None
            changes = self._resume_changes(ckpt, ckpt_file) if ckpt is not None else {}
            self.launch()
            sim = self.build_simulator()
            history: dict[int, dict[str, float]] = {}
            if ckpt is not None:
                self._check_partition_record(ckpt_file)
                _load_simulator_state(sim, ckpt, ckpt_file)
                history = {int(r): m for r, m in ckpt["history"].items()}
            if self.comm.any(flag.raised):  # a signal during start-up, on any rank
                self._print("preempted during start-up, before anything was written; rerun with --resume auto")
                return {"preempted": True, "round": sim.round}
            lock = self._lock_run_dir(ckpt_file)
            try:
                return self._fit_locked(sim, ckpt, ckpt_file, history, changes, flag)
            finally:
                lock.release()
        finally:
            flag.uninstall()

    def _fit_locked(self, sim: Simulator, ckpt: dict | None, ckpt_file: Path | None, history: dict,
                    changes: dict[str, tuple[Any, Any]], flag: PreemptionFlag) -> dict[str, Any]:
        if self.is_rank_zero:
            # Disk client state a killed process wrote after the checkpoint (or, without one, in any round: a run
            # killed before its first checkpoint starts afresh and must not read its predecessor's client files).
            sim.store.discard_after(sim.round)
        manifest = ckpt["simulator"]["store"].get("journal") if ckpt is not None else None
        self._journal = ClientJournal(Path(self.run_dir) / CKPT_DIR / CLIENTS_DIR)
        self._journal.restore(manifest if self.is_rank_zero else None)
        self._ckpt_bases = {sim.round: int(manifest["base_round"])} if manifest else {}
        sim.comm.barrier()
        if ckpt is not None:
            self._print(f"resumed from {ckpt_file} (round {sim.round})")
        self._environment = self._environment_record() if self.is_rank_zero else {}
        self._write_run_files(sim, fresh=ckpt is None)
        self._record_environment(sim, ckpt_file, changes)
        csv_logger, wandb_logger = self._loggers(sim.round if ckpt else None, ckpt)
        bar = ProgressBar(self.trainer_cfg.rounds, sim.round, self.logging_cfg.progress_bar and self.is_rank_zero)
        status = "failed"
        try:
            self._loop(sim, history, bar, flag, csv_logger, wandb_logger)
            status = "success"
        except NonFiniteLossError as err:
            latest = latest_checkpoint(self.run_dir)
            kept = (f"the last good checkpoint, {latest}, is kept" if latest is not None else
                    "no checkpoint exists yet and none was written")
            raise NonFiniteLossError(f"{err} {kept[0].upper()}{kept[1:]}.") from None
        finally:
            bar.close()
            if status == "failed":  # on success the loggers close after the final report (the W&B summary)
                _finalize(csv_logger, wandb_logger, status=status)
        if sim.round < self.trainer_cfg.rounds:
            _finalize(csv_logger, wandb_logger)
            self._print(f"preempted: checkpoint written at round {sim.round}; continue with --resume auto")
            return {"preempted": True, "round": sim.round}
        report = self._finish(sim, history, wandb_logger)
        _finalize(csv_logger, wandb_logger)
        return report

    def _finish(self, sim: Simulator, history: dict, wandb_logger: Any) -> dict[str, Any]:
        """After the last round: post-training stages, the final report, ``final.json`` and ``clients.json``."""
        # Post-training stages write the client store as a version after the last round: a crash in them and a
        # resume start again from the last checkpoint's client state.
        sim.store.begin_round(sim.round + 1)
        post = sim.evaluate() if sim.method.on_fit_end(sim) else None
        report = final_report(history)
        if post is not None:
            # A post-training stage changed the models (e.g. FedLoGe's realignment): one more evaluation.
            report["post_training"] = post
        if wandb_logger is not None:
            wandb_logger.log_final(report)
        clients = sim.evaluator.client_accuracies()  # collective: every rank
        if self.is_rank_zero:
            if clients is not None:  # per-client PM accuracy of the last evaluation (fedlt report's pm_clients.png)
                clients.update(round=sim.round, post_training=post is not None)
                (self.run_dir / "clients.json").write_text(json.dumps(clients, indent=1))
            (self.run_dir / "final.json").write_text(json.dumps(report, indent=2))
            self._print(format_table(report))
            if post is not None:
                self._print("after the post-training stage:\n" + format_table(final_report({sim.round: post}, last=1)))
        return report

    def _read_resume_checkpoint(self, path: Path) -> dict[str, Any]:
        """Reads the checkpoint to resume from; an unreadable one (truncated by a crash of the file system, say)
        names the newest intact checkpoint of the run instead of silently falling back to it."""
        try:
            return _read_checkpoint(path)
        except UserError as err:
            intact = None
            for _, older in reversed(list_checkpoints(self.run_dir)):
                if older != path:
                    try:
                        _read_checkpoint(older)
                    except UserError:
                        continue
                    intact = older
                    break
            hint = (f" The newest intact checkpoint is {intact}: resume from it with --resume {intact}." if intact
                    else " No intact checkpoint is left in the run directory.")
            raise UserError(f"{err}.{hint}") from None

    def _resume_changes(self, ckpt: dict[str, Any], ckpt_file: Path | None) -> dict[str, tuple[Any, Any]]:
        """The resume guard: the config may differ from the checkpoint's only in fields that cannot change the
        result (:data:`fedlt.engine.rundir.RESUME_ALLOWED`); returns those differences, refuses any other."""
        stored = ckpt.get("config")
        if not isinstance(stored, str):
            raise UserError(f"checkpoint {ckpt_file} holds no config to compare with; it cannot be resumed safely")
        allowed, refused = config_changes(stored, self.config_yaml)
        if refused:
            rnd = ckpt["simulator"]["round"]
            raise UserError(
                f"--resume: the config differs from the one that trained {ckpt_file} (round {rnd})"
                f" in settings that change the result:\n{format_changes(refused)}\nResume with the original values, "
                "or start a new run (another --run_dir). A resume may change only: "
                + ", ".join(a + "*" if a.endswith(".") else a for a in RESUME_ALLOWED))
        rounds = int(ckpt["simulator"]["round"])
        later = [r for r, _ in list_checkpoints(self.run_dir) if r > rounds]
        if later and self.trainer_cfg.client_state == "disk":
            raise UserError(f"--resume {ckpt_file}: the run directory holds later checkpoints (rounds "
                            f"{', '.join(map(str, later))}), and resuming from an earlier one discards the disk client "
                            "state they need. Resume from the latest (--resume auto), or move the later ones away.")
        if self.trainer_cfg.rounds < rounds:
            raise UserError(f"--trainer.rounds {self.trainer_cfg.rounds}: the checkpoint {ckpt_file} is already at "
                            f"round {rounds}; pass at least that many rounds")
        return allowed

    def _check_partition_record(self, ckpt_file: Path | None) -> None:
        """A resume rebuilds the partition from the config: it must be the one ``partition.json`` recorded at the
        start (the same data and splits; another version of a dataset, say, would change them silently)."""
        record = self.run_dir / "partition.json"
        if not record.is_file():
            return
        try:
            stored = json.loads(record.read_text())
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {record} ({err}): the partition this run started with is unknown, so "
                            f"--resume {ckpt_file} cannot check it. Restore the file, or start a new run.") from None
        now = json.loads(json.dumps(self.data.summary()))
        differ = [k for k in _PARTITION_FIELDS if k in stored and stored[k] != now.get(k)]
        if differ:
            raise UserError(f"--resume: the data now split differently from {record} ({', '.join(differ)} "
                            "differ): the data set or its files changed since round 1. Resume with the original "
                            "data, or start a new run.")

    def _lock_run_dir(self, ckpt_file: Path | None) -> RunDirLock:
        """Rank 0 takes the run directory's lock (all ranks agree whether it could), then checks that no other
        process changed what this run decided on before it held the lock (fresh vs. resume)."""
        lock = RunDirLock(self.run_dir)
        problem = None
        if self.is_rank_zero:
            try:
                lock.acquire()
                if ckpt_file is None and latest_checkpoint(self.run_dir) is not None:
                    problem = (f"run directory {self.run_dir} gained checkpoints while this run started; "
                               "continue it with --resume auto")
            except RunDirBusy as err:
                problem = str(err)
        if self.comm.any(problem is not None):
            lock.release()  # a no-op unless this process took it: a busy directory keeps its holder's note
            raise UserError(problem or f"rank 0 could not take the run directory {self.run_dir}")
        if self.is_rank_zero:
            remove_stale_temporaries(self.run_dir)
        return lock

    def _loop(self, sim: Simulator, history: dict, bar: ProgressBar, flag: PreemptionFlag,
              csv_logger: Any, wandb_logger: Any) -> None:
        t = self.trainer_cfg
        self._wandb_id = wandb_logger.version if wandb_logger is not None else None
        for rnd in range(sim.round + 1, t.rounds + 1):
            result = sim.run_round(rnd)
            metrics = dict(result.metrics)
            if sim.should_evaluate(rnd):
                metrics.update(sim.evaluate())
            history[rnd] = metrics
            for lg in (csv_logger, wandb_logger):
                if lg is not None:
                    lg.log_metrics(metrics, step=rnd)
            bar.update(rnd, metrics, sim.method.prog_bar_metrics)
            last = rnd == t.rounds
            failpoint("round.end")
            stop = sim.preempted(flag.raised)
            if last or stop or (t.checkpoint_every > 0 and rnd % t.checkpoint_every == 0):
                self._checkpoint(sim, history)
            if stop:
                return

    def _checkpoint(self, sim: Simulator, history: dict) -> None:
        state = sim.state_dict(client_states=False)  # every rank participates (none today, but keep it safe)
        dirty = sim.store.take_dirty()  # on every rank, so that no rank's set grows without bound
        if self.is_rank_zero:
            if sim.store.mode != "disk":  # the client states go to the journal: only the changed ones
                manifest = self._journal.record(sim.round, sim.store.states(), dirty)
                state["store"] = {**state["store"], "journal": manifest}
                self._ckpt_bases[sim.round] = manifest["base_round"]
            save_atomic({"simulator": state, "history": history, "wandb_id": self._wandb_id,
                         "config": self.config_yaml, "seed": self.seed}, checkpoint_path(self.run_dir, sim.round))
            prune_checkpoints(self.run_dir, self.trainer_cfg.keep_checkpoints)
            if sim.store.mode != "disk" and self.trainer_cfg.keep_checkpoints > 0:
                kept = list_checkpoints(self.run_dir)
                if kept:
                    self._journal.prune(self._base_round(*kept[0]))
        sim.comm.barrier()
        kept = list_checkpoints(self.run_dir) if self.trainer_cfg.keep_checkpoints > 0 else []
        if kept:  # disk client state: versions that no kept checkpoint can need may go
            sim.store.retain_from(kept[0][0])

    def _base_round(self, round: int, path: Path) -> int:
        """The journal base round of a kept checkpoint (read from the file for one written before a resume)."""
        if round not in self._ckpt_bases:
            store = torch.load(path, map_location="cpu", weights_only=False)["simulator"]["store"]
            self._ckpt_bases[round] = int(store.get("journal", {}).get("base_round", 0))
        return self._ckpt_bases[round]

    def _loggers(self, resume_round: int | None, ckpt: dict | None) -> tuple[Any, Any]:
        """Rank 0's CSV and W&B loggers (``None`` elsewhere); a resumed run continues its W&B run."""
        if not self.is_rank_zero:
            return None, None
        from fedlt.callbacks.loggers import CSVMetricsLogger, WandbFabricLogger, run_tags  # lightning: run time only

        csv_logger = CSVMetricsLogger(self.run_dir, resume_round)
        lc = self.logging_cfg
        if not lc.wandb:
            return csv_logger, None
        summary = self.data.summary()
        wandb_logger = WandbFabricLogger(
            self.run_dir, project=lc.project, entity=lc.entity, name=self.name, mode=lc.wandb_mode,
            tags=run_tags(summary, self.method.name, self.seed, lc.tags), group=lc.group,
            job_type=lc.job_type or self.method.name, run_id=(ckpt or {}).get("wandb_id"),
            config=self._wandb_config(summary),
        )
        if wandb_logger.mode == "disabled":
            return csv_logger, None
        if ckpt is None:
            wandb_logger.log_partition(summary)
        return csv_logger, wandb_logger

    def _environment_record(self) -> dict[str, Any]:
        t = self.trainer_cfg
        device, world = self.comm.device, self.comm.world_size
        return environment_record(device, world_size=world, precision=t.precision, num_nodes=t.num_nodes)

    def _record_environment(self, sim: Simulator, ckpt_file: Path | None,
                            changes: dict[str, tuple[Any, Any]]) -> None:
        """Rank 0: ``environment.json`` for a fresh run; a resume appends to the resume log when, from which round
        and checkpoint, the allowed settings it changed and its environment, and leaves the first record as is."""
        if not self.is_rank_zero:
            return
        if ckpt_file is None:
            write_environment(self.run_dir, self._environment)
        else:
            append_resume(self.run_dir, {"time": self._environment["time"], "round": sim.round,
                                         "checkpoint": str(ckpt_file),
                                         "changes": {k: list(v) for k, v in changes.items()},
                                         "environment": self._environment})

    def _wandb_config(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The resolved config with dotted keys, plus ``method`` (registry name), ``dataset`` and ``partition.*``
        (the partitioner's name and parameters) as convenience keys for grouping runs in dashboards, and the
        environment record (``environment.*``: versions, host, devices, SLURM ids)."""
        from fedlt.callbacks.loggers import flatten_config

        extra = {"method": self.method.name, "dataset": summary.get("source"), "partition": summary.get("partition"),
                 "environment": self._environment}
        return {**flatten_config(_config_dict(self.config_yaml)), **flatten_config(extra)}

    def _write_run_files(self, sim: Simulator, fresh: bool) -> None:
        """A fresh run writes ``config.yaml`` and ``partition.json`` once; a resume never rewrites them."""
        if not self.is_rank_zero:
            return
        if fresh:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.run_dir / "config.yaml", self.config_yaml)
            self.data.save_summary(self.run_dir / "partition.json")
        s = self.data.summary()
        groups = s.get("group_sizes", {})
        self._print(
            f"fedlt: {self.method.name} on {s.get('source')} | {self.data.num_clients} clients, "
            f"{len(self.data.train)} train / {len(self.data.test)} test samples, {self.data.num_classes} classes | "
            f"groups ({s.get('group_convention')}): {groups} | world size {sim.world_size} | run dir {self.run_dir}"
        )
        self._print(self.hardware.describe(self.trainer_cfg.clients_per_round, self.data.num_clients))

    # -- validate / partition ------------------------------------------------------------------------------
    def validate(self, ckpt_path: str) -> dict[str, float]:
        """Evaluates GM and PM of a checkpoint."""
        if not Path(ckpt_path).is_file():
            raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        self.launch()
        sim = self.build_simulator()
        _load_simulator_state(sim, _read_checkpoint(ckpt_path), ckpt_path)
        metrics = sim.evaluate()
        if self.is_rank_zero:
            report = final_report({sim.round: metrics}, last=1)
            self._print(f"checkpoint {ckpt_path} (round {sim.round})")
            self._print(format_table(report))
        return metrics

    def partition(self, plot: str | None = None, out: str | None = None) -> dict[str, Any]:
        """Builds the federated split on the CPU, prints its summary, optionally saves JSON and a PNG."""
        from fedlt.data.plot import plot_partition

        try:
            self.data.setup("cpu")
        except ConfigError:
            raise
        except ValueError as err:  # settings of the data that cannot work (as in build_simulator)
            raise ConfigError(str(err)) from err
        summary = self.data.summary()
        sizes = summary["client_sizes"]
        print(json.dumps({k: v for k, v in summary.items() if k not in ("client_class_counts",)}, indent=1))
        print(f"clients: {len(sizes)}  size min/median/max: {min(sizes)}/{sorted(sizes)[len(sizes) // 2]}/{max(sizes)}")
        if out:
            self.data.save_summary(out)
        if plot:
            plot_partition(summary, plot)
            print(f"partition plot written to {plot}")
        return summary


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _with_trainer_values(config_yaml: str, values: dict[str, Any]) -> str:
    """The config text with ``trainer.<key>`` set to ``values`` (the resolved hardware)."""
    import yaml

    loaded = yaml.safe_load(config_yaml) if config_yaml else None
    if not isinstance(loaded, dict):
        return config_yaml
    loaded.setdefault("trainer", {}).update(values)
    return yaml.safe_dump(loaded, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _finalize(*loggers: Any, status: str = "success") -> None:
    """Closes the loggers that exist on this rank (W&B: finishes the run with ``status``)."""
    for lg in loggers:
        if lg is not None:
            lg.finalize(status)


def _config_dict(config_yaml: str) -> dict[str, Any]:
    """The resolved config as a nested dict (for the W&B run config)."""
    import yaml

    loaded = yaml.safe_load(config_yaml) if config_yaml else None
    return loaded if isinstance(loaded, dict) else {}


_PARTITION_FIELDS = ("num_classes", "num_clients", "train_size", "test_size", "class_counts", "client_sizes",
                     "client_class_counts", "local_test_sizes")


def _load_simulator_state(sim: Simulator, ckpt: dict[str, Any], path: str | Path | None) -> None:
    """Restores a checkpoint's simulator state; one of another model or method is a user error."""
    try:
        sim.load_state_dict(ckpt["simulator"])
    except (RuntimeError, KeyError, ValueError) as err:  # shape mismatch, missing tensors, another store
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} does not fit this config's model and method ({first}); pass the "
                        "config that trained it") from None


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a fedlt checkpoint, turning an unreadable or foreign file into a user error."""
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # torch.load raises many types (pickle, zip, runtime) for a bad file
        raise UserError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or "simulator" not in ckpt:
        raise UserError(f"{path} is not a fedlt checkpoint (no simulator state)")
    return ckpt
