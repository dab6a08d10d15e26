"""The fast integer count-table parser equals pandas, and falls back to pandas for anything else."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stbench.data.readers.count_table import read_count_table


def _write(path: Path, text: str) -> Path:
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("seed", range(5))
def test_equals_pandas_on_random_integer_tables(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.negative_binomial(1, 0.3, size=(rng.integers(1, 30), rng.integers(1, 40))) * rng.choice(
        [1, 1, 1, 1000], size=1
    )
    df = pd.DataFrame(
        m, index=[f"{i}x{i + 1}" for i in range(m.shape[0])], columns=[f"G{j}" for j in range(m.shape[1])]
    )
    p = tmp_path / "t.tsv.gz"
    df.to_csv(p, sep="\t")
    got = read_count_table(p)
    ref = pd.read_csv(p, sep="\t", index_col=0)
    pd.testing.assert_frame_equal(got, ref.astype(float), check_names=False)


@pytest.mark.parametrize("cell", ["1.5", "NaN", "-2", "1e3", ""])
def test_non_integer_cells_fall_back_to_pandas(tmp_path: Path, cell: str) -> None:
    p = _write(tmp_path / "t.tsv.gz", f"\tA\tB\ns1\t1\t{cell}\ns2\t3\t4\n")
    got = read_count_table(p)
    ref = pd.read_csv(p, sep="\t", index_col=0)
    pd.testing.assert_frame_equal(got.astype(float), ref.astype(float), check_names=False)


def test_crlf_and_plain_tsv(tmp_path: Path) -> None:
    p = tmp_path / "t.tsv"
    p.write_bytes(b"\tA\tB\r\ns1\t10\t0\r\ns2\t3\t42\r\n")
    got = read_count_table(p)
    assert got.loc["s2", "B"] == 42 and got.loc["s1", "A"] == 10 and list(got.columns) == ["A", "B"]
