"""The engine surface: one Comm for the ranks, RunInfo for the methods, the seeding helpers."""

from __future__ import annotations

import torch

from fedlt.engine.comm import Comm, RunInfo
from fedlt.engine.sharding import derive_seed, seed_global_rng, seeded_generator
from fedlt.methods import FedAvg


def test_a_single_process_comm_is_the_identity():
    comm = Comm()
    assert (comm.rank, comm.world_size, comm.distributed, comm.is_rank_zero) == (0, 1, False, True)
    buf = torch.arange(3.0)
    assert comm.sum_(buf) is buf and buf.tolist() == [0.0, 1.0, 2.0]
    assert comm.any(True) and not comm.any(False)
    assert comm.broadcast({"a": 1}) == {"a": 1}
    assert comm.all_gather_object("x") == ["x"]
    comm.barrier()


def test_seed_global_rng_gives_the_stream_of_torch_manual_seed():
    """Cheaper than torch.manual_seed, and the same dropout masks: results do not change."""
    torch.manual_seed(1234)
    want = torch.nn.functional.dropout(torch.ones(64), 0.5, training=True)
    torch.manual_seed(99)
    seed_global_rng(1234, torch.device("cpu"))
    got = torch.nn.functional.dropout(torch.ones(64), 0.5, training=True)
    assert torch.equal(got, want)


def test_seeded_generator_is_derive_seed_with_words_as_crc32():
    import zlib

    a = seeded_generator(7, "fedbabu", 3)
    b = torch.Generator().manual_seed(derive_seed(7, zlib.crc32(b"fedbabu"), 3))
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert not torch.equal(torch.rand(5, generator=seeded_generator(7, "fedbabu", 4)),
                           torch.rand(5, generator=seeded_generator(7, "fedbabu", 3)))


def _sim(method, seed: int):
    from fedlt.data import Dirichlet, EmbeddedDigits, FederatedDataset
    from fedlt.engine.simulator import Simulator
    from fedlt.models import build_model

    source = EmbeddedDigits(image_size=16, train_per_class=60, test_per_class=10, holdout_per_class=10)
    data = FederatedDataset(source, num_clients=4, imbalance_factor=5, partition=Dirichlet(0.5, min_size=5), seed=0)
    data.setup("cpu")
    torch.manual_seed(0)
    net = build_model("cnn", num_classes=10, in_channels=data.in_channels, image_size=16, channels=(4, 8), hidden=16)
    return Simulator(None, data, net, method, rounds=3, clients_per_round=2, seed=seed, client_state="memory").setup()


def test_methods_get_the_run_before_setup():
    sim = _sim(FedAvg(lr=0.05, batch_size=16), seed=5)
    run = sim.method.run
    assert isinstance(run, RunInfo) and (run.seed, run.rounds) == (5, 3) and run.comm is sim.comm


def test_server_randomness_follows_the_experiment_seed_not_the_data_seed():
    """The data seed is pinned (0) in both runs; only the experiment seed differs: CReFF's synthetic features are
    drawn from it (they used to come from the data seed, so pinning it froze them)."""
    from fedlt.methods.creff import CReFF

    a = _sim(CReFF(lr=0.05, batch_size=16, num_of_feature=2), seed=0).reducer.features
    b = _sim(CReFF(lr=0.05, batch_size=16, num_of_feature=2), seed=1).reducer.features
    c = _sim(CReFF(lr=0.05, batch_size=16, num_of_feature=2), seed=1).reducer.features
    assert not torch.equal(a, b) and torch.equal(b, c)
