"""Every shipped config parses and resolves (``fedlt fit --print_config``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedlt.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
CONFIGS = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "baselines").glob("*.yaml"), *PAPER_CONFIGS])
METHOD_CONFIGS = sorted((ROOT / "configs" / "method").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["trainer"]["rounds"] >= 1 and "class_path" in resolved["method"]


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: p.name)
def test_method_config_composes_with_quickstart(config, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(config), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    # Class name = registry key up to case and underscores (ZeroShotCLIP is zeroshot_clip).
    assert resolved["method"]["class_path"].rsplit(".", 1)[-1].lower() == config.stem.replace("_", "")


def test_quickstart_matches_the_issue_protocol():
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    assert cfg["data"]["imbalance_factor"] == 100 and cfg["data"]["num_clients"] == 20
    assert cfg["data"]["partition"]["init_args"]["alpha"] == 0.5
    assert cfg["data"]["source"]["class_path"] == "EmbeddedDigits"


def test_readme_methods_table_is_generated_from_the_registry():
    from fedlt.cli import methods_markdown

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- methods:start", 1)[1].split("-->", 1)[1].split("<!-- methods:end -->", 1)[0]
    assert block.strip() == methods_markdown().strip(), "regenerate with: fedlt methods --markdown"


def test_paper_configs_cover_the_tables_and_name_their_target():
    """Issue 4: FedLoGe CIFAR-10/100-LT (alpha 0.5/1, IF 50/100) and RedGrape MNIST/CIFAR-10/CIFAR-100-LT
    (IF 10/50/100, full and partial participation); issue 6: FedPuReL ImageNet-LT, Places-LT and the CIFAR-100-LT
    alpha sweep, FedSM CIFAR-10/100-LT (IF 10/50/100) and ImageNet-LT; every header names its table and the number to
    reproduce."""
    names = {p.stem for p in PAPER_CONFIGS}
    fedloge = {f"fedloge_{d}_lt_a{a}_if{i}" for d in ("cifar10", "cifar100") for a in ("05", "10") for i in (50, 100)}
    redgrape = {f"redgrape_{d}_lt_if{i}_{p}" for d in ("mnist", "cifar10", "cifar100") for i in (10, 50, 100)
                for p in ("full", "partial")}
    fedpurel = {f"fedpurel_cifar100_lt_a{a}" for a in ("01", "05", "10", "50")} | {"fedpurel_imagenet_lt",
                                                                                  "fedpurel_places_lt"}
    fedsm = {f"fedsm_{d}_lt_if{i}" for d in ("cifar10", "cifar100") for i in (10, 50, 100)} | {"fedsm_imagenet_lt"}
    assert fedloge | redgrape | fedpurel | fedsm <= names
    for path in PAPER_CONFIGS:
        header = path.read_text().split("\n", 1)[0]
        assert "Table" in header and any(ch.isdigit() for ch in header.split(":", 1)[1]), path.name
        cfg = yaml.safe_load(path.read_text())
        assert cfg["name"] == path.stem
