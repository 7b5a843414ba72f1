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
    # our files are not the real ones, so only their md5 check is bypassed: the loading is real
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    reproduce = load_reproduce()
    out = tmp_path / "out"
    code = reproduce.main(
        [
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "data"),
            "--seeds",
            "1",
            "--tables",
            "1",
            "--epochs",
            "1",
            "--teacher-epochs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    with open(out / "reproduce.csv") as fh:
        rows = list(csv.DictReader(fh))
    names = [r["row"] for r in rows]
    assert names == ["student", "AT", "KD", "AT+KD"]  # F-ActT needs equal widths: skipped
    assert all(0 <= float(r["mean"]) <= 100 for r in rows)
    text = (out / "reproduce.md").read_text()
    assert (
        text.startswith("cifar10: teacher wrn16_2")
        and "| 1 | AT+KD |" in text
        and "| 7.51 |" in text
    )


def test_digits_path_table_2(tmp_path):
    reproduce = load_reproduce()
    out = tmp_path / "out"
    assert (
        reproduce.main(
            [
                "--seeds",
                "2",
                "--tables",
                "2",
                "--epochs",
                "1",
                "--teacher-epochs",
                "1",
                "--labels",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with open(out / "reproduce.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["row"] for r in rows] == ["F_sum", "F_sum^2", "F_sum^4", "F_max^1"]
    assert all(len(r["errors"].split()) == 2 for r in rows)


def test_rows_cover_the_papers_tables():
    reproduce = load_reproduce()
    by_table = {}
    for row in reproduce.rows(1e3):
        by_table.setdefault(row.table, []).append(row.name)
    assert by_table[1] == ["student", "AT", "F-ActT", "KD", "AT+KD"]
    assert by_table[3] == ["baseline", "min-l2", "grad-AT", "KD", "symmetry", "activation AT"]
    with pytest.raises(SystemExit):
        reproduce.main(["--dataset", "imagenet"])


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
    argv = ["--smoke", "--out", str(out), "--methods", "fake_hint,fake_embedding,fake_indexed"]
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
    assert reproduce.main(["--smoke", "--out", str(out)]) == 0
    with open(out / "zoo.csv") as fh:
        rows = [r["row"] for r in csv.DictReader(fh)]
    # the first three athooks-zoo methods when the zoo is installed, else the reference rows
    assert rows == (zoo[:3] if len(zoo) >= 3 else ["student", "AT", "KD"])
