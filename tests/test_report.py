"""`sharpness report` on a small real sweep on digits, a damaged results folder, and the findings' rules."""

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from scipy.stats import kendalltau

from sharpness import cli, findings, report, results
from sharpness.findings import Cell
from sharpness.train import RunConfig

COMMON = ["--quiet", "--max_epochs", "3", "--abridged_size", "200", "--acc_goal", "0.8"]
SETTINGS = dict(max_epochs=3, abridged_size=200, acc_goal=0.8)
MIN_FIGURE_BYTES = 5000


@contextlib.contextmanager
def results_env(root: Path):
    """$RESULTS = root, and one torch thread (these tiny runs are several times faster on a busy machine)."""
    old, threads = os.environ.get("RESULTS"), torch.get_num_threads()
    os.environ["RESULTS"] = str(root)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("RESULTS", None)
        else:
            os.environ["RESULTS"] = old


def train(arch, bs, lr, *extra):
    assert cli.main(["train", "digits", arch, str(bs), str(lr), *COMMON, *extra]) == 0


def run_dir(root, arch, bs, lr, **kw):
    return Path(root) / results.run_relpath(RunConfig("digits", arch, bs, lr, **{**SETTINGS, **kw}))


def fake_run(root, template: Path, arch, lr, lam, test_acc):
    """A run folder in the real layout, from a real summary with changed config and results."""
    summary = json.loads((template / "summary.json").read_text())
    summary["config"].update(arch_id=arch, lr=lr)
    summary["lambda_max"]["value"] = lam
    summary["final"]["test_acc"] = test_acc
    summary["two_over_lr"] = 2 / lr
    d = Path(root) / results.run_relpath(RunConfig(**summary["config"]))
    d.mkdir(parents=True)
    summary["run_dir"] = str(results.run_relpath(RunConfig(**summary["config"])))
    (d / "summary.json").write_text(json.dumps(summary))
    shutil.copy(template / "metrics.csv", d / "metrics.csv")
    return d


# BN vs no BN (fake, see fake_run): BN is sharper at 0.05 and flatter at 0.1, and better at both
BN_RUNS = [("vgg11_no_dropout", 0.05, 10.0, 0.80), ("vgg11_no_dropout", 0.1, 8.0, 0.82),
           ("vgg11_bn_no_dropout", 0.05, 12.0, 0.85), ("vgg11_bn_no_dropout", 0.1, 6.0, 0.86)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real sweep on digits: SGD at 3 learning rates x 2 batch sizes, SAM at 2 batch sizes, a second
    seed, λmax during training for one run, two dropout rates, repeated λmax and trace for one run;
    plus BN / no-BN runs written in the real layout (VGG on CPU is too slow for a unit test)."""
    root = tmp_path_factory.mktemp("sweep") / "results"
    with results_env(root):
        for bs in (32, 128):
            for lr in (0.05, 0.1, 0.2):
                train("mlp_p=0", bs, lr, *(["--eig_freq", "10"] if (bs, lr) == (128, 0.2) else []))
            train("mlp_p=0", bs, 0.1, "--opt", "sam")
        train("mlp_p=0", 128, 0.1, "--network_seed", "1")
        for arch in ("mlp_p=5e-1", "mlp_p=7e-1"):
            train(arch, 32, 0.1)
        measured = run_dir(root, "mlp_p=0", 32, 0.1)
        assert cli.main(["measure", str(measured), "--what", "lambda_max,trace", "--repeats", "2",
                         "--abridged_size", "200", "--samples", "5", "--quiet"]) == 0
    for arch, lr, lam, acc in BN_RUNS:
        fake_run(root, run_dir(root, "mlp_p=0", 32, 0.05), arch, lr, lam, acc)
    return root


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert cli.main(["report", str(sweep), "--out", str(out)]) == 0
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(text):
    return float(text) if text not in ("", None) else None


def check_image(path: Path):
    assert path.stat().st_size > MIN_FIGURE_BYTES, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) > 300


def test_every_figure_is_a_real_image(built):
    stats = json.loads((built / "stats.json").read_text())
    files = stats["figures"]
    prefixes = {Path(f).name.split("-")[0] for f in files if not f.startswith("figures/runs/")}
    assert prefixes == {"1_lambda_vs_lr", "2_test_acc_vs_lr", "3_acc_vs_lambda", "4_sgd_vs_sam", "5_dropout",
                        "6_batchnorm"}
    per_run = [f for f in files if f.startswith("figures/runs/")]
    assert len(per_run) == stats["runs"]  # every run has metrics.csv
    assert any("eig_freq_10" in f for f in per_run)
    for f in files:
        check_image(built / f)
    text = (built / "report.md").read_text()
    for f in files:
        assert f"]({f})" in text


def test_runs_csv_matches_summaries(built, sweep):
    rows = read_csv(built / "runs.csv")
    summaries = sorted(sweep.rglob("summary.json"))
    assert len(rows) == len(summaries) == 11 + len(BN_RUNS)
    by_dir = {r["run_dir"]: r for r in rows}
    for path in summaries:
        s = json.loads(path.read_text())
        r = by_dir[str(path.parent.relative_to(sweep))]
        assert r["status"] == s["status"] == "done"
        for k, v in s["config"].items():
            assert r[k] == ("" if v is None else str(v)), k
        for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert num(r[k]) == s["final"][k]
        assert num(r["gap_acc"]) == pytest.approx(s["final"]["train_acc"] - s["final"]["test_acc"])
        assert num(r["gap_loss"]) == pytest.approx(s["final"]["test_loss"] - s["final"]["train_loss"])
        assert num(r["lambda_max"]) == s["lambda_max"]["value"]
        assert num(r["lambda_max_residual"]) == s["lambda_max"]["residual"]
        assert int(r["epochs"]) == s["epochs"] and num(r["two_over_lr"]) == pytest.approx(2 / s["config"]["lr"])
    measured = by_dir[str(run_dir(sweep, "mlp_p=0", 32, 0.1).relative_to(sweep))]
    recs = {m["what"]: m for m in json.loads((run_dir(sweep, "mlp_p=0", 32, 0.1) / "measurements.json")
                                               .read_text())["measurements"]}
    assert int(measured["lambda_max_repeats"]) == 2
    assert num(measured["lambda_max_mean"]) == recs["lambda_max"]["value"]
    assert num(measured["lambda_max_stderr"]) == recs["lambda_max"]["stderr"]
    assert num(measured["trace"]) == recs["trace"]["value"]
    others = [r for r in rows if r is not measured]
    assert all(r["lambda_max_mean"] == "" and r["trace"] == "" and r["lambda_max_repeats"] == "1" for r in others)


def test_kendall_tau_matches_scipy(built):
    rows = [r for r in read_csv(built / "runs.csv") if r["status"] == "done"]
    stats = json.loads((built / "stats.json").read_text())
    taus = {e["group"]: e for e in stats["kendall"]}
    # batch-size and optimizer groups stay inside one setting (here: digits, plain MLP, the test's
    # acc_goal and abridged_size); the pooled row says that it pools
    mlp = [r for r in rows if r["arch_id"] == "mlp_p=0"]
    title = "digits · mlp_p=0 · acc_goal=0.8 · abridged_size=200"
    groups = {"all runs (pooled across settings)": rows, title: mlp,
              f"{title} · batch size 32": [r for r in mlp if r["batch_size"] == "32"],
              f"{title} · optimizer SGD": [r for r in mlp if r["opt"] == "sgd"]}
    assert not any(name.startswith("batch size") or name.startswith("optimizer") for name in taus)
    for name, g in groups.items():
        lam = [num(r["lambda_max"]) for r in g]
        for y, key in (("test_acc", "test_acc"), ("gap_acc", "gap_acc")):
            expected = kendalltau(lam, [num(r[key]) for r in g])
            got = taus[name][f"lambda_max_vs_{y}"]
            assert taus[name]["n"] == len(g)
            assert got["tau"] == pytest.approx(expected.statistic) and got["p_value"] == pytest.approx(expected.pvalue)
    # SAM has 2 runs: too few for a tau, and said so
    assert f"{title} · optimizer SAM ρ=0.05" not in taus
    assert any(n.startswith(f"{title} · optimizer SAM ρ=0.05: 2 run(s)") for n in stats["kendall_skipped"])


def test_report_text_tables_and_findings(built):
    text = (built / "report.md").read_text()
    stats = json.loads((built / "stats.json").read_text())
    assert len(stats["findings"]) == 5
    for f in stats["findings"]:
        assert f["verdict"] in ("supported", "not supported", "not enough runs")
        assert f"### Finding {f['finding']}: {f['verdict']}" in text
        for p in f["parts"]:
            assert p["rule"] in text
    # the fake BN runs are built to support finding 5 (BN sharper at one η, better at both)
    assert stats["findings"][4]["verdict"] == "supported"
    # two seeds at (SGD, 128, 0.1): mean ± standard error in the table
    assert "| SGD | 128 | 0.1 | " in text and " ± " in text and "| 2 |" in text
    assert "2/η" in text and "Kendall" in text


def test_results_load_has_the_columns_of_runs_csv(built, sweep):
    df = results.load(sweep)
    with open(built / "runs.csv", newline="") as f:
        header = next(csv.reader(f))
    assert list(df.columns) == header
    assert len(df) == len(read_csv(built / "runs.csv"))
    row = df[df["run_dir"] == str(run_dir(sweep, "mlp_p=0", 32, 0.1).relative_to(sweep))].iloc[0]
    assert row["lambda_max"] == json.loads((run_dir(sweep, "mlp_p=0", 32, 0.1) / "summary.json")
                                           .read_text())["lambda_max"]["value"]


def test_results_load_without_pandas(sweep, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(report.SharpnessError, match=r"pip install 'sharpness\[notebook\]'"):
        results.load(sweep)


def test_damaged_folder_still_reports(sweep, tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(sweep, root)
    with results_env(root):
        assert cli.main(["train", "digits", "mlp_p=0", "32", "20", *COMMON]) == 0  # diverges
    diverged = run_dir(root, "mlp_p=0", 32, 20.0)
    no_metrics = run_dir(root, "mlp_p=0", 32, 0.05)
    (no_metrics / "metrics.csv").unlink()
    measured = run_dir(root, "mlp_p=0", 32, 0.1)
    (measured / "measurements.json").write_text("{broken")
    in_progress = run_dir(root, "mlp_p=0", 128, 0.05)
    (in_progress / "summary.json").unlink()  # a checkpoint and no summary: an interrupted run
    running = run_dir(root, "mlp_p=0", 32, 0.2)
    (running / "summary.json").unlink()  # the same, with a live process holding its lock
    corrupt_summary = run_dir(root, "mlp_p=0", 128, 0.1)
    (corrupt_summary / "summary.json").write_text("{not json")
    lost = root / "digits/arch_mlp_p=0/ce/sgd/no_change_lr/lr_0.3_bs_32_0"
    lost.mkdir(parents=True)
    (lost / "checkpoint").write_bytes(b"garbage")
    failed = root / "digits/arch_mlp_p=0/ce/sgd/no_change_lr/lr_0.4_bs_32_0"
    failed.mkdir(parents=True)
    (failed / report.FAILURE).write_text(json.dumps({"error": "worker lost 3 times",
                                                     "config": RunConfig("digits", "mlp_p=0", 32, 0.4).identity()}))
    capsys.readouterr()
    out = tmp_path / "out"
    with results.RunLock(running):
        assert cli.main(["report", str(root), "--out", str(out), "--format", "pdf"]) == 0
    console = capsys.readouterr().out
    rows = {r["run_dir"]: r for r in read_csv(out / "runs.csv")}
    rel = lambda d: str(d.relative_to(root))  # noqa: E731
    assert rows[rel(diverged)]["status"] == "diverged" and rows[rel(diverged)]["lambda_max"] == ""
    assert "diverged at epoch 0" in rows[rel(diverged)]["note"]
    assert rows[rel(in_progress)]["status"] == "interrupted"
    assert rows[rel(running)]["status"] == "running" and rows[rel(running)]["train_acc"] == ""
    assert rows[rel(in_progress)]["lr"] == "0.05" and rows[rel(in_progress)]["epochs"] != ""
    assert rows[rel(corrupt_summary)]["status"] == "unreadable" and "cannot read" in rows[rel(corrupt_summary)]["note"]
    assert rows[rel(corrupt_summary)]["batch_size"] == "128"  # settings from the checkpoint
    assert rows[rel(lost)]["status"] == "interrupted" and rows[rel(lost)]["dataset"] == ""
    assert "settings unknown" in rows[rel(lost)]["note"]
    assert rows[rel(failed)]["status"] == "failed" and "worker lost 3 times" in rows[rel(failed)]["note"]
    assert rows[rel(measured)]["status"] == "done" and rows[rel(measured)]["lambda_max_mean"] == ""
    assert "measurements.json" in rows[rel(measured)]["note"]
    text = (out / "report.md").read_text()
    for d in (diverged, in_progress, running, corrupt_summary, lost, failed):
        assert f"| {rel(d)} |" in text.split("## Figures not drawn")[0]
        assert f"left out of the figures: {rel(d)}" in console
    assert f"figure 7 (training curves) for {rel(no_metrics)}: metrics.csv missing or unreadable" in text
    assert "metrics.csv missing" in console
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status_counts"] == {"diverged": 1, "done": 11 + len(BN_RUNS) - 3, "failed": 1, "interrupted": 2,
                                      "running": 1, "unreadable": 1}
    for f in stats["figures"]:
        assert (out / f).read_bytes()[:4] == b"%PDF" and (out / f).stat().st_size > MIN_FIGURE_BYTES


def test_sweep_file_source(sweep, tmp_path):
    config = tmp_path / "lr.toml"
    config.write_text(f"""
[sweep]
results = "{sweep}"

[fixed]
dataset = "digits"
arch_id = "mlp_p=0"
batch_size = 32
max_epochs = 3
abridged_size = 200
acc_goal = 0.8

[grid]
lr = [0.05, 0.1, 0.2, 0.4]
""")
    assert cli.main(["report", str(config), "--format", "svg"]) == 0
    out = sweep / "reports" / "lr"  # the default for a sweep file: <its results root>/reports/<name>
    rows = read_csv(out / "runs.csv")
    assert [(r["lr"], r["status"]) for r in rows] == [("0.05", "done"), ("0.1", "done"), ("0.2", "done"),
                                                      ("0.4", "pending")]
    assert rows[0]["run_dir"] == str(run_dir(sweep, "mlp_p=0", 32, 0.05).relative_to(sweep))
    stats = json.loads((out / "stats.json").read_text())
    assert any(f.startswith("figures/1_lambda_vs_lr-") for f in stats["figures"])
    for f in stats["figures"]:
        assert b"<svg" in (out / f).read_bytes()[:400]
    assert any("figure 4 (SGD vs SAM)" in s for s in stats["figures_skipped"])
    shutil.rmtree(out.parent)  # leave the shared sweep as it was


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "nowhere", "no such results folder"),
    (lambda p: p / "missing.toml", "sweep file not found"),
    (lambda p: p, "no runs in"),
])
def test_bad_source(tmp_path, capsys, make, fragment):
    assert cli.main(["report", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_cli_does_not_import_plotting_or_pandas():
    code = ("import sys; from sharpness import cli; cli.build_parser(); "
            "print(sorted(m for m in ('matplotlib', 'pandas', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- the findings' rules on hand-made seed means ------------------------------------------------

def cell(lr, bs, lam, acc, arch="mlp_p=0", opt="sgd", acc_se=None, **settings):
    row = RunConfig("digits", arch, bs, lr, opt=opt, **settings).identity()
    return Cell(findings.panel_key(row), findings.opt_label(row), bs, lr, 1, lam, None, acc, acc_se, 0.05, None)


def verdicts(fn, cells):
    return [p["verdict"] for p in fn(cells)]


def test_finding_1_rule():
    flatter = [cell(0.05, 32, 8, 0.80), cell(0.1, 32, 6, 0.85), cell(0.05, 256, 9, 0.80), cell(0.1, 256, 7, 0.78)]
    assert verdicts(findings.finding_1, flatter) == ["supported", "supported"]
    sharper = [cell(0.05, 32, 6, 0.80), cell(0.1, 32, 8, 0.85)]
    assert verdicts(findings.finding_1, sharper) == ["not supported", "not enough runs"]
    assert verdicts(findings.finding_1, [cell(0.05, 32, 6, 0.8)]) == ["not enough runs", "not enough runs"]


def test_finding_2_rule():
    scaled = [cell(0.05, 32, 8, 0.80), cell(0.2, 128, 5, 0.805)]
    assert verdicts(findings.finding_2, scaled) == ["supported", "supported"]
    assert verdicts(findings.finding_2, [cell(0.05, 32, 8, 0.80), cell(0.2, 128, 7.9, 0.90)]) == \
        ["not supported", "not supported"]
    # seed noise widens the tolerance: 2 standard errors of 1 point
    noisy = [cell(0.05, 32, 8, 0.80, acc_se=0.01), cell(0.2, 128, 5, 0.815)]
    assert verdicts(findings.finding_2, noisy)[1] == "supported"


def test_finding_3_rule():
    sam = [cell(0.1, 32, 8, 0.80), cell(0.1, 32, 6, 0.85, opt="sam"),
           cell(0.1, 512, 9, 0.80), cell(0.1, 512, 7, 0.80, opt="sam")]
    assert verdicts(findings.finding_3, sam) == ["supported", "supported"]
    sam[3] = cell(0.1, 512, 9.5, 0.86, opt="sam")
    assert verdicts(findings.finding_3, sam) == ["not supported", "not supported"]
    sam[3] = cell(0.1, 512, 7, 0.75, opt="sam")  # SAM worse at the large batch: no benefit there either
    assert verdicts(findings.finding_3, sam) == ["supported", "supported"]
    assert verdicts(findings.finding_3, sam[:1]) == ["not enough runs", "not enough runs"]


def test_finding_4_rule():
    drop = [cell(0.1, 32, 9, 0.85, "mlp_p=0"), cell(0.1, 32, 7, 0.88, "mlp_p=2e-1"), cell(0.1, 32, 5, 0.80, "mlp_p=7e-1")]
    assert verdicts(findings.finding_4, drop) == ["supported", "supported"]
    assert verdicts(findings.finding_4, drop[:2]) == ["not enough runs", "not enough runs"]  # p <= 0.2 is not "very high"
    drop[2] = cell(0.1, 32, 12, 0.875, "mlp_p=7e-1")
    assert verdicts(findings.finding_4, drop) == ["not supported", "not supported"]
    # λmax at the top p between the others is not "below every smaller p"; accuracy is compared with
    # the best smaller p (here p=0.2), not the first
    mixed = [cell(0.1, 32, 9, 0.80, "mlp_p=0"), cell(0.1, 32, 7, 0.88, "mlp_p=2e-1"),
             cell(0.1, 32, 8, 0.81, "mlp_p=7e-1")]
    assert verdicts(findings.finding_4, mixed) == ["supported", "not supported"]


def test_finding_5_rule():
    pairs = [cell(0.1, 32, 8, 0.80, "vgg11_no_dropout"), cell(0.1, 32, 6, 0.85, "vgg11_bn_no_dropout"),
             cell(0.2, 32, 7, 0.80, "vgg11_no_dropout"), cell(0.2, 32, 5, 0.79, "vgg11_bn_no_dropout")]
    assert verdicts(findings.finding_5, pairs) == ["not supported", "not supported"]
    assert verdicts(findings.finding_5, pairs[:2]) == ["not enough runs", "supported"]


def test_finding_5_pairs_between_iterates_bn_runs_with_their_twins():
    """The paper measures BN nets at small learning rates between iterates and their twins at the final
    iterate: such runs are still pairs, and the numbers say which protocol each λmax comes from."""
    pairs = [cell(0.005, 100, 8, 0.80, "vgg11_no_dropout"),
             cell(0.005, 100, 9, 0.85, "vgg11_bn_no_dropout", between_iterates=True),
             cell(0.1, 100, 7, 0.80, "vgg11_no_dropout"), cell(0.1, 100, 5, 0.83, "vgg11_bn_no_dropout")]
    parts = findings.finding_5(pairs)
    assert [p["verdict"] for p in parts] == ["supported", "supported"]
    assert len(parts[0]["numbers"]) == 2
    assert "λmax BN 9 (between iterates) vs no BN 8;" in parts[0]["numbers"][0]
    # an unrelated setting (another abridged_size) is not a twin
    other = [pairs[0], cell(0.005, 100, 9, 0.85, "vgg11_bn_no_dropout", abridged_size=500)]
    assert findings.finding_5(other)[0]["numbers"] == []


def test_repeated_lambda_max_of_another_protocol_is_not_shown_as_the_mean(sweep, tmp_path):
    src = run_dir(sweep, "mlp_p=0", 32, 0.1)  # measured with --repeats 2 on subsets of 200, as its λmax
    d = tmp_path / "run"
    shutil.copytree(src, d)
    assert report.read_run(d, tmp_path).row["lambda_max_repeats"] == 2
    data = json.loads((d / "measurements.json").read_text())
    for rec in data["measurements"]:
        rec["mode"] = "eval"
    (d / "measurements.json").write_text(json.dumps(data))
    row = report.read_run(d, tmp_path).row
    assert row["lambda_max_mean"] is None and row["lambda_max_repeats"] == 1
    assert "another protocol (mode eval vs train)" in row["note"]


def test_runs_whose_lambda_settings_differ_from_the_sweep_file_are_remeasure(sweep):
    d = run_dir(sweep, "mlp_p=0", 32, 0.05)
    config = {**json.loads((d / "summary.json").read_text())["config"], "abridged_size": 150}
    row = report.read_run(d, sweep, config).row
    assert row["status"] == "remeasure" and "abridged_size=200" in row["note"] and "abridged_size=150" in row["note"]
    assert report.read_run(d, sweep).row["status"] == "done"


@pytest.mark.parametrize("damage, field, expected", [
    ({"lambda_max": 4.2}, "lambda_max", None), ({"final": [1, 2]}, "test_acc", None),
    ({"status": 3}, "status", "unknown"), ({"epochs": "many", "diverged_at": None}, "epochs", None)])
def test_structurally_wrong_summary_is_a_note_not_a_crash(sweep, tmp_path, damage, field, expected):
    d = tmp_path / "run"
    shutil.copytree(run_dir(sweep, "mlp_p=0", 32, 0.05), d)
    summary = {**json.loads((d / "summary.json").read_text()), **damage}
    (d / "summary.json").write_text(json.dumps(summary))
    row = report.read_run(d, tmp_path).row
    assert row[field] == expected
    assert findings.usable(row) == (field == "epochs")  # a damaged epoch count alone does not hide the run


def test_physical_batch_size_separates_panels_only_for_batchnorm_nets():
    def key(arch, physical):
        return findings.panel_key(RunConfig("digits", arch, 1000, 0.1, physical_batch_size=physical).identity())

    assert key("mlp_p=0", 500) == key("mlp_p=0", 1000)  # accumulation over chunks: the same steps
    assert key("vgg11_bn_no_dropout", 500) != key("vgg11_bn_no_dropout", 1000)  # the BN batch differs
    bn, plain = (cell(0.1, 1000, lam, acc, arch, physical_batch_size=500)
                 for arch, lam, acc in (("vgg11_bn_no_dropout", 9, 0.85), ("vgg11_no_dropout", 8, 0.8)))
    assert findings.bn_twin(bn, [bn, plain]) is plain


@pytest.mark.parametrize("change", [{"batch_size": "sixteen"}, {"opt": "sam", "rho": None}, {"lr": -1.0},
                                    {"dataset": None}])
def test_wrongly_typed_config_is_a_note_not_a_crash(sweep, tmp_path, capsys, change):
    """A summary.json whose config is not a valid run's: the report is built, the row says why."""
    root = tmp_path / "results"
    shutil.copytree(sweep, root)
    d = run_dir(root, "mlp_p=0", 32, 0.05)
    summary = json.loads((d / "summary.json").read_text())
    summary["config"].update(change)
    (d / "summary.json").write_text(json.dumps(summary))
    assert cli.main(["report", str(root), "--out", str(tmp_path / "out")]) == 0
    row = {r["run_dir"]: r for r in read_csv(tmp_path / "out" / "runs.csv")}[str(d.relative_to(root))]
    assert row["dataset"] == "" and row["note"].count("settings unknown") == 1
    assert "recorded config is not a valid run's" in row["note"]


def test_report_on_one_run_directory_names_its_figure(sweep, tmp_path):
    d = run_dir(sweep, "mlp_p=0", 32, 0.05)
    assert cli.main(["report", str(d), "--out", str(tmp_path / "out")]) == 0
    names = [p.name for p in (tmp_path / "out" / "figures" / "runs").iterdir()]
    assert names and not any(n.startswith(".") for n in names)
