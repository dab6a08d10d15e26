"""Shared fixtures. Real data lives in ../shared/data beside the repository (never committed)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HER2ST = SHARED_DATA / "her2st"
XENIUM_CROP = SHARED_DATA / "xenium-crop"
HER2ST_IMAGE_SLIDES = {"B4": 283, "C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """real_data tests skip only when ../shared/data is absent (never silently otherwise)."""
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
    for item in items:
        if "real_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes into a user's data root."""
    monkeypatch.setenv("STBENCH_DATA", str(tmp_path_factory.getbasetemp() / "stbench-data-default"))


@pytest.fixture(scope="session")
def her2st_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Her2ST prepared once per session from ../shared/data/her2st into a temporary data root."""
    if not HER2ST.is_dir():
        pytest.skip(f"real data not found at {HER2ST}")
    from stbench.data.prepare import prepare

    root = tmp_path_factory.mktemp("her2st-root")
    prepare("her2st", root, HER2ST)
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic dataset prepared once per session (method fit + test tests share it)."""
    from stbench.data.prepare import prepare

    root = tmp_path_factory.mktemp("synthetic-root")
    prepare("synthetic", root)
    return root


@pytest.fixture(scope="session")
def mean_row(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The `mean` predictor's result row on the harness fold (computed once per session)."""
    from method_harness import mean_baseline

    return mean_baseline(synthetic_root, tmp_path_factory.mktemp("mean-run"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread avoids OpenMP contention on a busy 2-core machine (the module
    asks with `pytestmark = pytest.mark.usefixtures("one_thread")`); restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
