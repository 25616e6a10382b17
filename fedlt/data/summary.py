"""The JSON description of a federated split (``FederatedDataset.summary()``): sizes, class counts and groups per
client, and the settings behind them, for ``partition.json``, the W&B run and ``plot_partition``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlt.data.longtail import GROUP_NAMES

if TYPE_CHECKING:
    from fedlt.data.federated import FederatedDataset

__all__ = ["federated_summary", "write_summary"]


def federated_summary(data: FederatedDataset) -> dict[str, Any]:
    """JSON-serialisable description of the federated split of a set-up ``data`` for logs and plots."""
    group_sizes = np.bincount(data.groups, minlength=len(GROUP_NAMES))
    assert data.image_size is not None  # set by setup()
    out = {
        "source": data.source_name,
        "num_classes": int(data.num_classes),
        "num_clients": int(data.num_clients),
        "imbalance_factor": data.imbalance_factor,
        "lt_profile": data.lt_profile,
        "partition": data.partition.describe() if data.partition is not None else {"name": "given"},
        "partition_unassigned": int(data.partition_unassigned),
        "local_test": data.local_test,
        "image_size": int(data.image_size),
        "stored_image_size": int(data.stored_image_size),
        "in_channels": int(data.in_channels),
        "normalization": data.normalization or "source",
        "augmentation": data.augmentation if data.augment else "off",
        "storage": "host" if data.host_images else "device",
        "mask_absent_classes": data.mask_absent_classes,
        "seed": data.seed,
        "group_convention": data.group_convention,
        "group_source": getattr(data, "group_source", "train"),
        "pm_group_source": getattr(data, "pm_group_source", "global"),
        "group_sizes": {name: int(group_sizes[g]) for g, name in enumerate(GROUP_NAMES)},
        "groups": [GROUP_NAMES[g] for g in data.groups],
        "train_size": len(data.train),
        "test_size": len(data.test),
        "class_counts": data.class_counts.tolist(),
        "client_sizes": data.client_sizes.tolist(),
        "client_class_counts": data.client_class_counts.tolist(),
        "local_test_sizes": [int(p.numel()) for p in data.client_test_indices],
        "local_test_shortfall": int(data.local_test_shortfall.sum()),
    }
    if data.domain_names and hasattr(data, "target_domain_id"):
        out.update({
            "domains": data.domain_names,
            "target_domain": data.domain_names[data.target_domain_id],
            "source_domains": [data.domain_names[d] for d in data.source_domain_ids],
            "domain_layout": data.domain_layout,
            "clients_per_domain": data.clients_per_domain if data.domain_layout == "clients_per_domain" else None,
            "domain_alpha": data.domain_alpha if data.domain_layout == "clients_per_domain" else None,
            "val_size": len(data.val) if data.val is not None else 0,
            "client_domain_counts": data.client_domain_counts.tolist(),
        })
    return out


def write_summary(summary: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes ``summary`` as JSON, atomically (temporary file + rename).

    Args:
        summary: a ``federated_summary``.
        path: destination file; parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)
