"""GPU-first defaults: ``auto`` accelerator, devices and precision resolve as in Lightning; missing hardware exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedlt.cli import main
from fedlt.engine import hardware
from fedlt.engine.hardware import HardwareError, resolve_hardware

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


class FakeCuda:
    """``torch.cuda`` of a node with ``count`` GPUs of compute capability ``major``.0."""

    def __init__(self, count: int, major: int = 9) -> None:
        self.count, self.major = count, major

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def get_device_capability(self, index: int) -> tuple[int, int]:
        assert 0 <= index < self.count
        return self.major, 0


@pytest.fixture
def gpus(monkeypatch):
    def install(count: int, major: int = 9) -> None:
        monkeypatch.setattr(hardware, "_cuda", lambda: FakeCuda(count, major))
    return install


def test_auto_is_every_gpu_with_bf16_on_ampere_and_newer(gpus):
    gpus(4, major=8)
    hw = resolve_hardware("auto", "auto", 2, "auto")
    assert (hw.accelerator, hw.devices, hw.num_nodes, hw.precision, hw.world_size) == ("cuda", 4, 2, "bf16-mixed", 8)
    gpus(2, major=7)  # Volta: no native bfloat16
    assert resolve_hardware("auto", "auto", 1, "auto").precision == "32-true"
    assert resolve_hardware("gpu", 1, 1, "16-mixed") == hardware.Hardware("cuda", 1, 1, "16-mixed")


def test_auto_without_a_gpu_is_one_cpu_process_in_float32(gpus):
    gpus(0)
    assert resolve_hardware("auto", "auto", 1, "auto") == hardware.Hardware("cpu", 1, 1, "32-true")
    assert resolve_hardware("cpu", 3, 1, "32") == hardware.Hardware("cpu", 3, 1, "32-true")  # gloo ranks
    resolved = resolve_hardware("auto", "auto", 1, "auto")
    assert resolve_hardware(resolved.accelerator, resolved.devices, 1, resolved.precision) == resolved


def test_missing_hardware_is_refused_with_what_exists(gpus):
    gpus(0)
    with pytest.raises(HardwareError, match="no CUDA GPU is visible"):
        resolve_hardware("cuda", 1, 1, "auto")
    gpus(2)
    with pytest.raises(HardwareError, match="this node has 2 visible GPUs. Ask for at most 2"):
        resolve_hardware("auto", 3, 1, "auto")
    with pytest.raises(HardwareError, match="precision"):
        resolve_hardware("auto", 1, 1, "8-bogus")


def test_the_cohort_line_names_hardware_and_sharding():
    line = hardware.Hardware("cuda", 4, 2, "bf16-mixed").describe(clients_per_round=10, num_clients=100)
    assert line == ("fedlt: accelerator cuda | 4 devices per node x 2 nodes = world size 8 | precision bf16-mixed | "
                    "cohort of 10 clients sharded over 8 ranks (balanced by local sample counts, every round)")
    one = hardware.Hardware("cpu", 1, 1, "32-true").describe(clients_per_round=50, num_clients=20)
    assert "world size 1" in one and one.endswith("cohort of 20 clients sharded over 1 rank (all on this rank)")


def test_print_config_shows_auto_and_config_yaml_records_the_resolved_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"),
              "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("auto", "auto", "auto")
    run = tmp_path / "run"
    assert main(["fit", "--config", TINY, "--run_dir", str(run), "--trainer.rounds", "1", "--trainer.accelerator",
                 "auto", "--trainer.devices", "auto", "--trainer.precision", "auto", "--logging.wandb", "false"]) == 0
    out = capsys.readouterr().out
    assert "fedlt: accelerator cpu | 1 device per node x 1 node = world size 1 | precision 32-true" in out
    recorded = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (recorded["accelerator"], recorded["devices"], recorded["precision"]) == ("cpu", 1, "32-true")
    # A resume with the same 'auto' config resolves to the same values: the resume guard lets it through.
    assert main(["fit", "--config", TINY, "--run_dir", str(run), "--trainer.rounds", "2", "--resume", "auto",
                 "--logging.wandb", "false"]) == 0


@pytest.mark.parametrize("args, needle", [
    (["--trainer.accelerator", "gpu"], "no CUDA GPU is visible"),
    (["--trainer.accelerator", "auto", "--trainer.devices", "3"], "this node has 2 visible GPUs"),
    (["--trainer.devices", "atuo"], "--trainer.devices atuo: expected a whole number or 'auto'"),
    (["--trainer.accelerator", "tpuz"], "trainer.accelerator must be one of auto, cpu, gpu, cuda"),
])
def test_missing_or_misspelt_hardware_exits_2_before_anything_is_written(gpus, tmp_path, capsys, args, needle):
    gpus(0 if "gpu" in args else 2)
    assert main(["fit", "--config", TINY, "--run_dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
