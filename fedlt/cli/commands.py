"""The commands fit / validate / partition / methods, and the error policy they run under."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fedlt.cli.errors import ENVIRONMENT_ERRNOS, EXIT_PREEMPTED, environment_message, usage_error, user_errors
from fedlt.cli.parser import COMMANDS, build, make_experiment


def methods_markdown() -> str:
    """The README's table of methods (name, paper, venue, config), generated from the registry."""
    from fedlt.methods import METHODS

    rows = ["| name | paper | venue | config |", "|---|---|---|---|"]
    for key, cls in METHODS.items():
        paper = cls.paper
        title = paper.title if paper else "-"
        if paper and paper.arxiv:
            title = f"[{title}](https://arxiv.org/abs/{paper.arxiv})"
        rows.append(f"| {key} | {title} | {paper.venue if paper else '-'} | `configs/method/{key}.yaml` |")
    return "\n".join(rows)


def cmd_methods(argv: Sequence[str]) -> int:
    """Prints the registered methods and their papers (``--markdown``: the README table)."""
    from fedlt.methods import METHODS

    if argv and argv[0] in ("-h", "--help"):
        print("usage: fedlt methods [--markdown]\n\n" + COMMANDS["methods"])
        return 0
    if argv and argv[0] == "--markdown":
        print(methods_markdown())
        return 0
    if argv:
        return usage_error(f"unknown argument {argv[0]!r} for 'fedlt methods'; valid: --markdown")
    width = max(len(k) for k in METHODS.names())
    for key, cls in METHODS.items():
        paper = cls.paper.short() if cls.paper else "-"
        print(f"{key:<{width}}  {cls.__name__:<12}  {paper}")
    return 0


def fit_all_domains(parser: Any, cfg: Any, init: Any) -> int:
    """``data.target_domain: all``: one leave-one-domain-out run per domain (in ``<run_dir>/<domain>``), then the
    per-target and mean accuracies, printed and written to ``<run_dir>/domains.json``."""
    import copy
    import json
    from pathlib import Path

    from fedlt.callbacks.report import domain_summary, format_domain_table

    root = Path(init.run_dir or os.path.join("runs", init.name))
    reports: dict[str, dict[str, Any]] = {}
    for domain in init.data.domain_names:
        sub = copy.deepcopy(cfg)
        sub.data.target_domain = domain
        sub.name = f"{init.name}-{domain}"
        sub.run_dir = str(root / domain)
        print(f"fedlt: target domain {domain} ({len(reports) + 1}/{len(init.data.domain_names)})", flush=True)
        report = make_experiment(parser, sub, parser.instantiate_classes(sub)).fit()
        if report.get("preempted"):
            return EXIT_PREEMPTED
        reports[domain] = report
    summary = domain_summary(reports)
    # Rank 0 of every launcher: RANK / LOCAL_RANK under Fabric's own, SLURM_PROCID under srun (which sets neither).
    if all(int(os.environ.get(k, "0")) == 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID")):
        root.mkdir(parents=True, exist_ok=True)
        (root / "domains.json").write_text(json.dumps(summary, indent=2))
        print(format_domain_table(summary), flush=True)
    return 0


def run_command(command: str, argv: Sequence[str]) -> int:
    parser, cfg, init = build(command, argv)
    if command == "fit" and getattr(init.data, "target_domain", None) == "all":
        return fit_all_domains(parser, cfg, init)
    exp = make_experiment(parser, cfg, init)
    if command == "fit":
        if exp.fit().get("preempted"):
            return EXIT_PREEMPTED
    elif command == "validate":
        exp.validate(init.ckpt_path)
    else:
        exp.partition(plot=init.plot, out=init.out)
    return 0


def guarded(command: str, rest: Sequence[str]) -> int:
    """fit / validate / partition with the error policy: user and environment errors -> message and status 2."""
    handler: Callable[[str, Sequence[str]], int] = run_command
    # fit: from here on SIGTERM/SIGUSR1 (SLURM's preemption signals) never kill fedlt with the default action:
    # caught during the imports and parsing, they reach fit's own handler, which stops before writing anything.
    from fedlt.signals import PreemptionFlag

    flag = PreemptionFlag().install() if command == "fit" else None
    try:
        return handler(command, rest)
    except user_errors() as err:
        return usage_error(str(err))
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise  # not the environment's fault: keep the traceback
        return usage_error(environment_message(err))
    except KeyboardInterrupt:
        print("fedlt: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()
        if flag is not None:
            flag.uninstall()


def shutdown_distributed() -> None:
    """Destroys the process group of a multi-process run before the interpreter exits. Without it, gloo's worker
    threads outlive the interpreter's finalization and the process can abort (SIGABRT, "terminate called without an
    active exception") after its work is done, turning a finished run into a failed exit status. Destroying a group
    is local to each rank (no collective), so it is safe on the error path too."""
    dist = sys.modules.get("torch.distributed")  # not imported: nothing was launched (and a usage error stays fast)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
