"""Contract: `vp2o plot` groups seeds of a run, draws each figure whose metrics exist (mean and min..max
band over seeds), writes an index.html linking exactly the PNGs it wrote, and rejects a directory without
metrics.jsonl (exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from megatron_vp2o.cli.main import main  # noqa: E402
from megatron_vp2o.monitor.plots import band, load_run, write_plots  # noqa: E402


def fake_run(path: Path, seed: int, steps: int = 6, vp2o: bool = True) -> Path:
    path.mkdir(parents=True)
    rows = [{"step": 0, "eval/pass_at_1": 0.5 + 0.01 * seed}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward/mean": 0.1 * s + seed, "reward/pass_at_1": 0.05 * s, "loss": 0.1,
               "timing/step": 0.2}
        for layer in (1, 2):
            row[f"moe/router_entropy/layer{layer}"] = 1.0 + 0.1 * layer - 0.01 * s
            row[f"moe/utilisation/layer{layer}"] = [float(s), 1.0, 2.0, 3.0]
            row[f"moe/proto_overlap/layer{layer}"] = 0.3 - 0.01 * s
        if vp2o:
            row |= {"vp2o/d_anc": 0.02 * s, "vp2o/decision": ["accept", "backtrack", "reject"][s % 3],
                    "vp2o/refreshed": s % 2 == 1, "vp2o/refreshes": (s + 1) // 2}
            if s % 2 == 0:
                row |= {"vp2o/drift": 0.01, "vp2o/ess": 0.9}
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_band_is_mean_min_max_over_seeds_at_each_step(tmp_path):
    runs = [load_run(fake_run(tmp_path / f"vp2o_seed{s}", s)) for s in (1, 2, 4)]
    assert {r.group for r in runs} == {"vp2o"}
    steps, mean, lo, hi = band(runs, "reward/mean")
    assert steps == list(range(1, 7))
    for s, m, a, b in zip(steps, mean, lo, hi):
        assert m == pytest.approx(0.1 * s + 7 / 3)
        assert (a, b) == (pytest.approx(0.1 * s + 1), pytest.approx(0.1 * s + 4))
    assert band(runs, "vp2o/drift")[0] == [2, 4, 6]  # only the steps that logged it
    assert load_run(fake_run(tmp_path / "ep2", 0)).group == "ep2"  # not a seed suffix
    assert load_run(fake_run(tmp_path / "grpo-seed_3", 0)).group == "grpo"
    study = load_run(fake_run(tmp_path / "study" / "digit_sum" / "vp2o" / "seed_2", 0))  # vp2o compare's layout
    assert (study.group, study.name) == ("digit_sum/vp2o", "digit_sum/vp2o/seed_2")


def test_plot_writes_figures_and_index(tmp_path, capsys):
    vp = [fake_run(tmp_path / f"vp2o_seed{s}", s) for s in (1, 2)]
    grpo = fake_run(tmp_path / "grpo_seed1", 3, vp2o=False)
    out = tmp_path / "plots"
    assert main(["plot", *map(str, vp), str(grpo), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(["reward.png", "eval.png", "router_entropy.png", "utilisation.png", "overlap.png",
                              "trust_region.png", "decisions.png"])
    index = (out / "index.html").read_text()
    assert all(f'src="{name}"' in index for name in written) and "vp2o_seed2 (vp2o)" in index
    assert all((out / n).stat().st_size > 5000 for n in written)  # a drawn figure, not an empty canvas
    # a run without VP2O keys: the trust-region figures are skipped, and the index does not list them
    only = write_plots([grpo], tmp_path / "grpo_plots")
    assert [n for n, _ in only] == ["reward.png", "eval.png", "router_entropy.png", "utilisation.png", "overlap.png"]
    assert "decisions.png" not in (tmp_path / "grpo_plots" / "index.html").read_text()
    assert not math.isnan(band([load_run(grpo)], "reward/mean")[1][0])


def test_plot_rejects_a_directory_without_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and len(err.strip().splitlines()) == 1
