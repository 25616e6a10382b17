"""Issue 5 end to end: the flagship PACS config (missing data, and a fake PACS tree) and ``target_domain: all``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from fedlt.cli import main

ROOT = Path(__file__).resolve().parents[2]
PACS = str(ROOT / "configs" / "fedtail_pacs.yaml")
DIGIT_DOMAINS = str(ROOT / "configs" / "fedtail_digit_domains.yaml")
sys.path.insert(0, str(ROOT / "tests" / "data"))
from fake_domains import write_fake_pacs  # noqa: E402

QUIET = ["--logging.wandb", "false", "--logging.progress_bar", "false"]


def test_flagship_without_pacs_exits_2_with_the_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's data root data/PACS does not exist here
    assert main(["fit", "--config", PACS, "--run_dir", str(tmp_path / "run"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlt: error:") and "Traceback" not in err
    assert "data/PACS" in err and "art_painting" in err and "domaingeneralization.github.io" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_flagship_runs_one_round_on_a_fake_pacs_tree(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_fake_pacs(tmp_path / "data" / "PACS", per_class=2, size=32)
    run = tmp_path / "run"
    code = main(["fit", "--config", PACS, "--run_dir", str(run), "--trainer.rounds", "1",
                 "--trainer.accelerator", "cpu", "--model.pretrained", "false",
                 "--data.source.init_args.image_size", "32", "--data.source.init_args.cache_dir", str(tmp_path / "c"),
                 *QUIET])
    out = capsys.readouterr().out
    assert code == 0, out
    final = json.loads((run / "final.json").read_text())
    # Target art_painting: 7 classes x 2 images, all of them in the test set and none in training.
    part = json.loads((run / "partition.json").read_text())
    assert part["target_domain"] == "art_painting" and part["test_size"] == 14
    assert part["source_domains"] == ["cartoon", "photo", "sketch"] and part["num_clients"] == 3
    acc = final["final"]["test/domain/art_painting/acc"]
    assert 0.0 <= acc <= 1.0 and acc == final["final"]["test/global/acc"]
    assert "target art_painting" in out


def test_target_domain_all_reports_every_target_and_the_mean(tmp_path, capsys):
    run = tmp_path / "all"
    code = main(["fit", "--config", DIGIT_DOMAINS, "--method", "FedAvg", "--data.target_domain", "all",
                 "--data.source.init_args.per_class", "20", "--data.source.init_args.val_per_class", "4",
                 "--data.source.init_args.image_size", "16", "--trainer.rounds", "1", "--run_dir", str(run), *QUIET])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((run / "domains.json").read_text())
    targets = ["plain", "textured", "inverted", "thick"]
    assert list(summary["targets"]) == targets
    for name in targets:
        report = json.loads((run / name / "final.json").read_text())
        assert summary["targets"][name]["final"] == report["final"][f"test/domain/{name}/acc"]
        assert json.loads((run / name / "partition.json").read_text())["target_domain"] == name
    mean = sum(t["final"] for t in summary["targets"].values()) / 4
    assert summary["mean"]["final"] == pytest.approx(mean)
    table = out[out.index("target domain") :]
    assert all(name in table for name in targets) and "mean" in table


def test_target_all_is_expanded_only_by_fit(capsys):
    # partition builds one dataset: 'all' is refused there with a pointer to `fedlt fit`, exit 2, no traceback.
    assert main(["partition", "--config", DIGIT_DOMAINS, "--data.target_domain", "all"]) == 2
    err = capsys.readouterr().err
    assert "target_domain 'all'" in err and "fedlt fit" in err and "plain" in err and "Traceback" not in err


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "dg").glob("fedtail_*.yaml")), ids=lambda p: p.name)
def test_dg_configs_resolve_and_name_their_target(config, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["target_domain"] and resolved["method"]["class_path"].endswith("FedTAIL")


OVERLAYS = sorted(p for p in (ROOT / "configs" / "dg").glob("*.yaml") if not p.name.startswith("fedtail_"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_baseline_overlays_compose_with_the_flagship(overlay, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", PACS, "--config", str(overlay), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    method = overlay.stem.split("_", 1)[0]
    assert resolved["method"]["class_path"].rsplit(".", 1)[-1].lower() == method
    assert resolved["method"]["init_args"]["lr"] == 0.001  # the flagship's local training settings
    assert resolved["data"]["domain_layout"] == ("centralized" if "centralized" in overlay.stem else "per_domain")


def test_flagship_without_pretrained_weights_explains_how_to_provide_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the weights cannot be found
    write_fake_pacs(tmp_path / "data" / "PACS", per_class=1, size=16)
    code = main(["fit", "--config", PACS, "--run_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu",
                 "--data.source.init_args.image_size", "16", "--data.source.init_args.cache_dir", str(tmp_path / "c"),
                 *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "resnet50" in err and "checkpoint_path" in err and "pretrained: false" in err


@pytest.mark.parametrize("args, needle", [
    (["--data.domain_layout", "ring"], "unknown domain_layout 'ring'; valid: per_domain, clients_per_domain"),
    (["--data.target_domain", "mars"], "unknown target_domain 'mars' for digit_domains; valid: plain, textured"),
    (["--method.init_args.qt", "oracle"],
     "unknown qt 'oracle'; valid: domain_heads, global_teacher, momentum_teacher (in FedTAIL"),
])
def test_bad_domain_settings_exit_2_with_one_line(tmp_path, capsys, args, needle):
    assert main(["fit", "--config", DIGIT_DOMAINS, "--run_dir", str(tmp_path), *args, *QUIET]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Namespace(" not in err and "Traceback" not in err


def test_a_config_with_the_old_embedded_source_name_names_the_new_one(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text(Path(DIGIT_DOMAINS).read_text().replace("EmbeddedDigitDomains", "EmbeddedDigitsDG"))
    assert main(["partition", "--config", str(old)]) == 2
    err = capsys.readouterr().err
    assert "EmbeddedDigitsDG was renamed to EmbeddedDigitDomains" in err and "Traceback" not in err


def test_flagship_configs_run_every_fedtail_component(tmp_path, recwarn):
    """Both FedTAIL configs switch every component on; on digit_domains (one client per source domain) round 2 trains
    the adversarial and coherence terms against the shared feature moments, without a warning."""
    for path in (PACS, DIGIT_DOMAINS):
        args = yaml.safe_load(Path(path).read_text())["method"]["init_args"]
        assert args["class_sam"] is True and args["er_weight"] > 0 and args["adversarial"] == "on"
        assert args["adv_source"] == "shared_stats" and args.get("coherence_alpha", 0.1) > 0
    run = tmp_path / "dg"
    code = main(["fit", "--config", DIGIT_DOMAINS, "--data.source.init_args.per_class", "20",
                 "--data.source.init_args.val_per_class", "4", "--data.source.init_args.image_size", "16",
                 "--method.init_args.hessian_iters", "2", "--trainer.rounds", "2", "--trainer.eval_every", "2",
                 "--run_dir", str(run), *QUIET])
    assert code == 0
    assert not [w for w in recwarn if "FedTAIL" in str(w.message)]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert not rows[0].get("train/loss_adv")  # round 1: no moments shared yet
    for part in ("train/loss_adv", "train/loss_coh", "train/loss_csam", "train/loss_er"):
        assert rows[1][part] != "", part
    assert float(rows[1]["train/loss_adv"]) > 0
