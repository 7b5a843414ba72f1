"""benchmarks/reproduce.py: the digits path and the CIFAR-10 path on a tiny on-disk CIFAR folder."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import pickle
import sys

import numpy as np
import pytest
import torchvision

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_tiny_cifar(root: pathlib.Path, per_batch: int = 12) -> None:
    """The CIFAR-10 python format: pickled dicts of uint8 rows (3072 = 3x32x32) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)


def test_cifar10_path_on_a_tiny_folder(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path / "data")
    monkeypatch.setenv("ATHOOKS_CACHE", str(tmp_path / "cache"))  # the 1-epoch teacher
    # our files are not the real ones, so only their md5 check is bypassed: the loading is real
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    reproduce = load_reproduce()
    out = tmp_path / "out"
    argv = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--seeds", "1"]
    argv += ["--tables", "1", "--pairs", "A", "--epochs", "1", "--teacher-epochs", "1"]
    argv += ["--val", "12", "--out", str(out)]
    assert reproduce.main(argv) == 0
    with open(out / "reproduce.csv") as fh:
        rows = list(csv.DictReader(fh))
    names = [r["row"] for r in rows]
    assert names == ["student", "AT", "KD", "AT+KD"]  # F-ActT needs equal widths: skipped
    assert all(0 <= float(r["mean"]) <= 100 for r in rows)
    text = (out / "reproduce.md").read_text()
    assert text.startswith("cifar10: students on 48 labelled images, 12 validation images")
    assert "| WRN-16-1 <- WRN-16-2 | AT+KD | beta=1000 alpha=0.9 T=4 |" in text
    assert "| 7.51 |" in text and "skipped" not in text.split("F-ActT")[0]


def test_digits_path_table_2(tmp_path, monkeypatch):
    monkeypatch.setenv("ATHOOKS_CACHE", str(tmp_path / "cache"))
    reproduce = load_reproduce()
    out = tmp_path / "out"
    argv = ["--seeds", "2", "--tables", "2", "--pairs", "A", "--epochs", "1"]
    argv += ["--teacher-epochs", "1", "--labels", "64", "--val", "64", "--out", str(out)]
    assert reproduce.main(argv) == 0
    with open(out / "reproduce.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["row"] for r in rows] == ["none", "F_sum", "F_sum^2 (AT)", "F_sum^4", "F_max^1"]
    assert all(len(r["errors"].split()) == 2 for r in rows)
    assert all(len(r["errors_best_val"].split()) == 2 for r in rows)


def test_tables_cover_the_papers_rows():
    reproduce = load_reproduce()
    by_table = {t: [m for _, m, _ in rows] for t, rows in reproduce.TABLES.items()}
    assert by_table["1"] == ["student", "AT", "F-ActT", "KD", "AT+KD"]
    assert by_table["2"] == ["student", "F_sum", "AT", "F_sum^4", "F_max^1"]
    assert by_table["3"] == ["student", "min-l2", "grad-AT", "KD", "symmetry", "AT"]
    assert {p for p, _, _ in reproduce.TABLES["pairs"]} == {"B", "C"}
    pairs = {(p.teacher, p.student) for p in reproduce.PAIRS.values()}
    assert pairs == {("wrn16_2", "wrn16_1"), ("wrn40_1", "wrn16_1"), ("wrn40_2", "wrn16_2")}
    with pytest.raises(SystemExit):
        reproduce.main(["--dataset", "imagenet"])
    with pytest.raises(SystemExit, match="unknown pair"):
        reproduce.main(["--pairs", "A,Z", "--tables", "1", "--smoke"])


def _run(reproduce, pair, method, setting, unlabeled, seed, phase, val, test):
    spec = reproduce.Plan([], 1, True, 300.0, 40, False).spec(
        pair, method, setting, unlabeled, seed, phase
    )
    key = reproduce.run_key(spec)
    return key, {"key": key, "val_last": str(val), "test_last": str(test), "skipped": ""}


def test_the_sweep_chooses_on_validation_never_on_test():
    reproduce = load_reproduce()
    plan = reproduce.Plan([reproduce.Cell("1", "A", "AT+KD")], 5, True, 300.0, 40, False)
    done = {}
    # AT: beta 300 is best on validation, beta 100 on test; KD: alpha 0.5 T 8 on validation
    for beta, val, test in [
        (30, 25.0, 4.0),
        (100, 20.0, 5.0),
        (300, 10.0, 30.0),
        (1000, 10.0, 9.0),
    ]:
        k, r = _run(reproduce, "A", "AT", {"beta": beta}, False, 10, "tune", val, test)
        done[k] = r
    assert not plan.ready(("A", "AT+KD", False), done)  # KD's sweep has not run
    for s in reproduce.KD_GRID:
        val = 5.0 if s == {"alpha": 0.5, "T": 8.0} else 15.0
        k, r = _run(reproduce, "A", "KD", s, False, 10, "tune", val, 1.0)
        done[k] = r
    assert plan.ready(("A", "AT+KD", False), done)
    # ties go to the earlier (smaller) weight: 300 over 1000
    assert plan.choose(("A", "AT", False), done) == {"beta": 300}
    assert plan.choose(("A", "KD", False), done) == {"alpha": 0.5, "T": 8.0}
    assert plan.choose(("A", "AT+KD", False), done) == {"beta": 300, "alpha": 0.5, "T": 8.0}
    finals = plan.final(("A", "AT+KD", False), done)
    assert [f["seed"] for f in finals] == [0, 1, 2, 3, 4]
    assert all(f["setting"] == {"beta": 300, "alpha": 0.5, "T": 8.0} for f in finals)
    untuned = reproduce.Plan([], 5, False, 300.0, 40, False)
    assert untuned.choose(("A", "KD", False), {}) == {"alpha": 0.9, "T": 4.0}


def test_kd_follows_the_authors_weighting():
    reproduce = load_reproduce()
    losses, ce = reproduce.build("KD", {"alpha": 0.9, "T": 4.0})
    assert ce == pytest.approx(0.1) and losses[0].weight == 0.9 and losses[0].temperature == 4.0
    losses, ce = reproduce.build("KD", {"alpha": 0.9, "T": 4.0, "ce": 1.0})
    assert ce == 1.0
    losses, ce = reproduce.build("AT+KD", {"beta": 300, "alpha": 0.5, "T": 2.0})
    assert [type(x).__name__ for x in losses] == ["AT", "KD"] and ce == 0.5
    assert reproduce.build("student", {}) == ([], 1.0)


def test_fit_adds_unlabeled_images_to_the_forward_not_to_the_cross_entropy():
    import torch

    import athooks
    from athooks.demo.run import DemoConfig
    from athooks.models import create_model

    reproduce = load_reproduce()
    torch.manual_seed(0)
    x, y = torch.randn(20, 1, 32, 32), torch.randint(0, 10, (20,))
    u = torch.randn(30, 1, 32, 32) + 100.0  # unlabeled images, recognisable by their mean
    config = DemoConfig(batch=8, shift=0)
    seen = {}
    for name, unlabeled in (("labelled", None), ("both", u)):
        torch.manual_seed(1)
        teacher = create_model("wrn16_1", num_classes=10, in_chans=1)
        student = create_model("wrn16_1", num_classes=10, in_chans=1)
        inputs: list[torch.Tensor] = []

        def record(module, args, inputs=inputs):
            if module.training:  # not the validation forwards
                inputs.append(args[0].detach().clone())

        student.register_forward_pre_hook(record)
        d = athooks.Distiller(teacher, student, losses=athooks.loss("kd"))
        with d:
            log = reproduce.fit(
                student,
                x,
                y,
                epochs=2,
                config=config,
                params=list(student.parameters()),
                distiller=d,
                unlabeled=unlabeled,
                validation=(x[:10], y[:10]),
            )
        seen[name] = inputs
        assert len(log["val"]) == 2 and log["best_epoch"] in (1, 2)
        assert log["best_state"] is not None
    labelled, both = seen["labelled"], seen["both"]
    assert [t.shape[0] for t in labelled[:3]] == [8, 8, 4]  # 20 images in batches of 8
    assert [t.shape[0] for t in both[:3]] == [16, 16, 8]  # as many unlabeled as labelled
    for a, b in zip(labelled[:6], both[:6], strict=True):
        n = a.shape[0]
        assert torch.equal(a, b[:n])  # the same labelled batches as without unlabeled images
        assert b[n:].mean() > 50  # the rest are the unlabeled images
    used = torch.cat([b[t.shape[0] :] for t, b in zip(labelled[:3], both[:3], strict=True)])
    assert len(used) == 20 and len({float(v.sum()) for v in used}) == 20  # drawn in turn


def test_paper_smoke_with_tune_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("ATHOOKS_CACHE", str(tmp_path / "cache"))
    reproduce = load_reproduce()
    out = tmp_path / "out"
    argv = ["--smoke", "--tune", "--tables", "1", "unlabeled", "--pairs", "A"]
    argv += ["--labels", "32", "--val", "32", "--out", str(out)]
    assert reproduce.main(argv) == 0
    with open(out / "paper-runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    tune = [r for r in runs if r["phase"] == "tune"]
    final = [r for r in runs if r["phase"] == "final"]
    assert {r["seed"] for r in tune} == {"10"} and {r["seed"] for r in final} == {"0", "1"}
    # the final KD runs use the sweep's lowest validation error (ties: the first tried)
    kd = [r for r in tune if r["method"] == "KD" and r["unlabeled"] == "False"]
    best = min(kd, key=lambda r: float(r["val_last"]))["setting"]
    assert {r["setting"] for r in final if r["method"] == "KD" and r["unlabeled"] == "False"} == {
        best
    }
    assert any(r["unlabeled"] == "True" for r in final)
    for r in runs:
        assert r["skipped"] or 0 <= float(r["test_best"]) <= 100
    text = (out / "reproduce.md").read_text()
    assert "### Distillation on unlabeled images" in text and "| AT + unlabeled |" in text
    assert "### The sweeps" in text
    # --resume trains nothing more
    assert reproduce.main([*argv, "--resume"]) == 0
    with open(out / "paper-runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(runs)


# --------------------------------------------------------------------------- the zoo table


class _FakeHint:
    """A stand-in for a zoo feature method: a connector on the student (in d.parameters())."""

    @staticmethod
    def build(weight: float = 1.0):
        import torch.nn.functional as F  # noqa: N812

        from athooks.plugin import Connectors, Features, Loss

        class FakeHint(Loss):
            name = "fake_hint"

            def __init__(self) -> None:
                super().__init__()
                self.features = Features()
                self.connectors = Connectors()

            def captures(self):
                return (self.features,)

            def forward(self, step):
                terms = []
                for i, (t, s) in enumerate(step.features(self.features)):
                    terms.append(F.mse_loss(self.connectors[i](s, t), t))
                return weight * sum(terms)

        return FakeHint()


def _fake_embedding(weight: float = 1.0):
    from athooks.plugin import Loss

    class FakeEmbedding(Loss):
        name = "fake_embedding"
        needs_embedding = True

        def forward(self, step):
            t, s = step.embedding()
            return weight * (s.norm(dim=1) - t.norm(dim=1)).pow(2).mean()

    return FakeEmbedding()


def _fake_indexed(n_data: int = 0):
    import torch

    from athooks.plugin import Loss

    class FakeIndexed(Loss):
        name = "fake_indexed"
        needs_teacher_output = True

        def forward(self, step):
            index = step.extra("index")
            assert int(index.max()) < n_data  # the harness passes dataset indices and n_data
            return torch.nn.functional.mse_loss(step.student_output, step.teacher_output)

    return FakeIndexed()


class FakeZoo:
    """Three losses under a provider named like athooks-zoo, so the harness lists them."""

    @staticmethod
    def athooks_losses():
        from athooks.plugin import LossSpec

        return [
            LossSpec("fake_hint", _FakeHint.build, "fake feature method"),
            LossSpec("fake_embedding", _fake_embedding, "fake embedding method"),
            LossSpec("fake_indexed", _fake_indexed, "fake method with a memory bank"),
        ]


@pytest.fixture
def fake_zoo(monkeypatch):
    import athooks
    from athooks.plugin import hookimpl

    plugin = FakeZoo()
    plugin.athooks_losses = hookimpl(FakeZoo.athooks_losses)
    athooks.get_plugin_manager().register(plugin, name="athooks-zoo-test")
    reproduce = load_reproduce()
    recipe = reproduce.Recipe(options={"n_data": reproduce.N_DATA}, extras=("index",))
    monkeypatch.setitem(reproduce.RECIPES, "fake_indexed", recipe)
    monkeypatch.setitem(reproduce.RECIPES, "fake_hint", reproduce.Recipe(init="student"))
    yield reproduce
    athooks.get_plugin_manager().unregister(plugin)


def test_zoo_rows_come_from_the_registry(fake_zoo):
    names = [r.name for r in fake_zoo.zoo_rows(300.0)]
    assert names[:3] == ["student", "AT", "KD"]
    assert {"fake_hint", "fake_embedding", "fake_indexed"} <= set(names)
    assert "at" not in names[3:] and "fact" not in names  # only athooks-zoo's losses
    with pytest.raises(SystemExit, match="no row or loss"):
        fake_zoo.zoo_rows(300.0, ["no_such_loss"])


def test_zoo_smoke(fake_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("ATHOOKS_CACHE", str(tmp_path / "cache"))  # the 1-epoch teacher
    out = tmp_path / "out"
    argv = ["--zoo", "--smoke", "--out", str(out), "--methods"]
    argv += ["fake_hint,fake_embedding,fake_indexed"]
    assert fake_zoo.main(argv) == 0
    with open(out / "zoo.csv") as fh:
        rows = {r["row"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["fake_hint", "fake_embedding", "fake_indexed"]
    for name, row in rows.items():
        assert row["skipped"] == "", (name, row["skipped"])
        assert 0 <= float(row["mean"]) <= 100 and row["seeds"] == "1"
    text = (out / "zoo.md").read_text()
    assert text.startswith("digits (smoke): teacher wrn16_2")
    assert "| teacher | wrn16_2" in text and "init: fake_hint() alone; then CE alone" in text
    with open(out / "zoo-runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    # --resume keeps the finished runs and trains nothing more
    assert fake_zoo.main([*argv, "--resume"]) == 0
    with open(out / "zoo-runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_zoo_smoke_picks_three_zoo_methods(tmp_path, monkeypatch):
    monkeypatch.setenv("ATHOOKS_CACHE", str(tmp_path / "cache"))
    reproduce = load_reproduce()
    zoo = [r.name for r in reproduce.zoo_rows(300.0) if r.provider]
    out = tmp_path / "out"
    assert reproduce.main(["--zoo", "--smoke", "--out", str(out)]) == 0
    with open(out / "zoo.csv") as fh:
        rows = [r["row"] for r in csv.DictReader(fh)]
    # the first three athooks-zoo methods when the zoo is installed, else the reference rows
    assert rows == (zoo[:3] if len(zoo) >= 3 else ["student", "AT", "KD"])
