"""Per-client state of a CLIP PEFT run (issue 6): what the engine aggregates, stores per client and checkpoints.

A ViT-B-16-sized open_clip model (random weights: byte counts and timings do not depend on the weights) with
prompt PEFT runs FedPuReL over ``--clients`` clients of the embedded digits at 224 px. Round 1 trains every client
(FedPuReL's full first round: Stage 1 and the interleaved Stage 2), so every client ends up holding its personal
prompt in the engine's client store. The script reports

* the frozen backbone (loaded once in the rank's workspace model, never copied per client),
* the shared state (aggregated, broadcast, checkpointed) and the per-client state the store holds,
* the checkpoint size, the process's peak RSS, and seconds per client (Stage 1 + Stage 2),

and fails if any backbone tensor reached the global state, the client store or the checkpoint.

Usage::

    python benchmarks/clip_memory.py [--model ViT-B-16] [--clients 100] [--peft prompt] [--device cpu|cuda]
        [--samples-per-client 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time

import torch

from fedlt.data import IID, EmbeddedDigits, FederatedDataset
from fedlt.engine.simulator import Simulator
from fedlt.methods import METHODS
from fedlt.models import build_model


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--peft", default="prompt", choices=["prompt", "lora", "adapter", "attention_adapter"])
    parser.add_argument("--method", default="fedpurel")
    parser.add_argument("--samples-per-client", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    per_class = max(1, args.clients * args.samples_per_client // 10)
    source = EmbeddedDigits(image_size=16, train_per_class=per_class, test_per_class=10)
    data = FederatedDataset(source, num_clients=args.clients, imbalance_factor=1, partition=IID(),
                            local_test="proportional", image_size=224, normalization="clip", augmentation="clip")
    data.setup(args.device)
    torch.manual_seed(0)
    model = build_model(f"clip:{args.model}", data.num_classes, class_names=data.class_names, dataset="digits",
                        peft=args.peft)
    method = METHODS.get(args.method)(batch_size=args.samples_per_client)
    sim = Simulator(None, data, model, method, rounds=1, clients_per_round=args.clients, client_state="cpu",
                    eval_every=0).setup()
    sim.model.to(args.device)

    frozen_keys = set(model.frozen_state_keys())
    state = model.state_dict()
    backbone = _bytes(state[k] for k in frozen_keys)
    shared = _bytes(sim.global_state.values())
    t0 = time.perf_counter()
    sim.run_round(1)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    stored = sim.store.state_dict()["states"]
    per_client = [_bytes(s.values()) for s in stored.values()]
    buf = io.BytesIO()
    torch.save(sim.state_dict(), buf)
    leaked = [k for s in stored.values() for k in s if k.removeprefix("model.") in frozen_keys]
    leaked += [k for k in sim.global_state if k in frozen_keys]
    result = {
        "model": args.model, "peft": args.peft, "method": args.method, "device": args.device,
        "clients": args.clients, "clients_with_state": len(stored),
        "backbone_tensors": len(frozen_keys), "backbone_mb": backbone / 2**20,
        "shared_keys": sorted(sim.global_state), "shared_bytes": shared,
        "per_client_keys": sorted(next(iter(stored.values()))) if stored else [],
        "per_client_bytes": max(per_client) if per_client else 0,
        "store_total_bytes": sum(per_client), "checkpoint_bytes": buf.getbuffer().nbytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "round_s": seconds, "seconds_per_client": seconds / args.clients,
        "backbone_tensors_in_federated_state": leaked,
    }
    for k, v in result.items():
        if isinstance(v, list) and len(v) > 4:
            v = f"{len(v)} keys: {', '.join(v[:3])}, ..."
        print(f"{k:38s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if leaked or len(stored) != args.clients:
        print("FAIL: backbone tensors in the federated state, or clients without state", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
