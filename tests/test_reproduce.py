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
