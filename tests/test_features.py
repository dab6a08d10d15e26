"""Feature store: cache key, reuse (0 forwards), resume after a kill, memmap reads, concat, sharding."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_standin import StandInEncoder

from stbench.data.datamodule import STDataModule
from stbench.data.features import (
    FeatureStore,
    feature_key,
    feature_provider,
    features_for,
    resolve_precision,
    split_names,
)
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.splits import Fold
from stbench.data.synthetic import generate_synthetic
from stbench.errors import DataError

SPEC = PatchSpec(out_px=16)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(
        tmp_path_factory.mktemp("syn") / "ds", n_slides=3, n_patients=3, spots_per_side=6, n_genes=12
    )


@pytest.fixture()
def slides(root: Path):
    return SyntheticReader(root).read_all()


def direct(enc: StandInEncoder, patches: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.array(patches)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return enc(x).numpy()


def test_extract_is_correct_memory_mapped_and_reused(slides, tmp_path: Path) -> None:
    patches = PatchStore(tmp_path, SPEC).build(slides[0])
    enc = StandInEncoder()
    feats = FeatureStore(tmp_path, chunk_size=8).extract(slides[0], patches, enc, batch_size=4, device="cpu")
    n = len(patches)
    assert feats.array.shape == (n, 104) and feats.array.dtype == np.float32
    assert isinstance(feats.array, np.memmap) and feats.array.mode == "r"
    assert enc.calls == sum(-(-min(8, n - lo) // 4) for lo in range(0, n, 8))  # batches within chunks
    assert enc.patches_seen == n
    np.testing.assert_allclose(feats.array, direct(StandInEncoder(), patches.patches), rtol=1e-5, atol=1e-6)
    assert feats.index["weights_id"] == "none" and feats.index["precision"] == "fp32"
    assert (feats.path / "index.json").exists() and not (feats.path / ".partial.npy").exists()
    # a fresh store object (a new job) reuses the cache: zero forwards
    enc2 = StandInEncoder()
    again = FeatureStore(tmp_path, chunk_size=8).extract(slides[0], patches, enc2, device="cpu")
    assert enc2.calls == 0 and again.path == feats.path
    np.testing.assert_array_equal(again.array, feats.array)
    shuffled = list(reversed(slides[0].spot_ids))
    np.testing.assert_array_equal(again.aligned(shuffled), np.asarray(feats.array)[::-1])


def test_cache_key_depends_on_encoder_weights_preprocessing_and_patches(slides, tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    p16 = PatchStore(tmp_path, SPEC).build(slides[0])
    p24 = PatchStore(tmp_path, PatchSpec(out_px=24)).build(slides[0])
    base = store.key(p16, StandInEncoder())
    assert store.key(p16, StandInEncoder()) == base  # deterministic
    assert FeatureStore(tmp_path, chunk_size=3).key(p16, StandInEncoder()) == base  # chunking is not a value
    assert store.key(p16, StandInEncoder(weights_id="file:abc")) != base
    assert store.key(p16, StandInEncoder(name="other")) != base
    assert store.key(p24, StandInEncoder()) != base
    assert store.key(p16, StandInEncoder(), precision="bf16") != base
    enc = StandInEncoder()
    object.__setattr__(enc, "spec", type(enc.spec)(input_px=32))
    assert store.key(p16, enc) != base
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda:0") == "bf16"
    with pytest.raises(DataError, match="precision"):
        resolve_precision("int8", "cpu")


def test_resume_after_interruption_recomputes_only_unfinished_chunks(slides, tmp_path: Path) -> None:
    patches = PatchStore(tmp_path, SPEC).build(slides[0])
    n = len(patches)
    store = FeatureStore(tmp_path, chunk_size=6)
    n_chunks = store.n_chunks(n)
    assert n_chunks >= 4
    enc = StandInEncoder()
    enc.fail_after = 5  # batch 3 per chunk of 6 -> 2 calls per chunk: chunks 0, 1 done, chunk 2 dies midway
    with pytest.raises(KeyboardInterrupt):
        store.extract(slides[0], patches, enc, batch_size=3, device="cpu")
    assert store.open(patches, enc) is None  # not visible as finished
    assert store.pending_chunks(patches, enc) == list(range(2, n_chunks))
    enc2 = StandInEncoder()
    feats = store.extract(slides[0], patches, enc2, batch_size=3, device="cpu")
    assert enc2.patches_seen == n - 12  # only chunks 2.. recomputed
    np.testing.assert_allclose(feats.array, direct(StandInEncoder(), patches.patches), rtol=1e-5, atol=1e-6)


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from encoder_standin import StandInEncoder
from stbench.data.features import FeatureStore, feature_provider
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.readers.synthetic import SyntheticReader

slides = SyntheticReader({root!r}).read_all()
enc = StandInEncoder()
orig = enc.forward
def forward(x):
    if enc.calls == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(x)
enc.forward = forward
fn = feature_provider("standin", "none", FeatureStore({cache!r}, chunk_size=6),
                      PatchStore({cache!r}, PatchSpec(out_px=16)), batch_size=3, device="cpu",
                      build=lambda name, w: enc)
for s in slides:
    fn(s)
"""


def test_sigkill_during_extraction_then_rerun_skips_finished_slides(
    root: Path, slides, tmp_path: Path
) -> None:
    """Criterion 5: a process SIGKILLed while extracting slide 2 leaves slide 1 finished; the
    re-run computes nothing for slide 1 and only the unfinished chunks of slide 2."""
    cache = tmp_path / "cache"
    patch_store = PatchStore(cache, SPEC)
    n0, n1 = (len(patch_store.build(s)) for s in slides[:2])
    per_slide_calls = [2 * FeatureStore(cache, 6).n_chunks(n) for n in (n0, n1)]  # upper bound
    kill_at = -(-n0 // 3) + 4  # after slide 0 and two chunks (4 batches of 3) of slide 1
    assert per_slide_calls[1] > 4
    script = KILL_SCRIPT.format(tests=str(TESTS), root=str(root), cache=str(cache), kill_at=kill_at)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = FeatureStore(cache, chunk_size=6)
    enc = StandInEncoder()
    p = [patch_store.build(s) for s in slides]
    assert store.open(p[0], enc) is not None and store.open(p[1], enc) is None
    assert store.pending_chunks(p[1], enc)[0] == 2
    seen: dict[str, int] = {}

    def build(name: str, w: str) -> StandInEncoder:
        return enc

    fn = feature_provider("standin", "none", store, patch_store, batch_size=3, device="cpu", build=build)
    for s in slides:
        before = enc.patches_seen
        out = fn(s)
        seen[s.name] = enc.patches_seen - before
        np.testing.assert_allclose(out, direct(StandInEncoder(), p[slides.index(s)].patches), atol=1e-6)
    assert seen[slides[0].name] == 0
    assert seen[slides[1].name] == n1 - 12
    assert seen[slides[2].name] == len(p[2])
    assert not list((cache / "features").rglob("*.tmp"))


def test_concatenated_encoders_keep_order_and_feed_the_datamodule(slides, tmp_path: Path) -> None:
    assert split_names("uni+conch") == ["uni", "conch"] and feature_key(["uni", "conch"]) == "uni+conch"
    built: dict[str, StandInEncoder] = {}

    def build(name: str, w: str) -> StandInEncoder:
        built[name] = StandInEncoder(name=name, weights_id=w, seed=len(name), dim=100 if name == "a" else 98)
        return built[name]

    store, ps = FeatureStore(tmp_path), PatchStore(tmp_path, SPEC)
    ab = feature_provider("a+bb", ["none", "file:x"], store, ps, device="cpu", build=build)(slides[0])
    ba = feature_provider(["bb", "a"], ["file:x", "none"], store, ps, device="cpu", build=build)(slides[0])
    assert ab.shape == (slides[0].n_spots, 198) and ab.dtype == np.float32
    np.testing.assert_array_equal(ab[:, :100], ba[:, 98:])
    np.testing.assert_array_equal(ab[:, 100:], ba[:, :98])
    assert not np.allclose(ab[:, 96:100], ab[:, 194:198])  # different encoders really differ
    with pytest.raises(DataError, match="weights"):
        feature_provider("a+bb", ["none"], store, ps, build=build)

    fold = Fold(
        0, "f", (slides[0].name, slides[1].name), (), (slides[2].name,), unit="patient", val_fraction=0.0
    )
    fn = feature_provider("a+bb", ["none", "file:x"], store, ps, device="cpu", build=build)
    dm = STDataModule(slides, fold, features={"a+bb": fn}, gene_rule="top_var", gene_n=5, batch_size=8)
    dm.setup("fit")
    b = next(iter(dm.test_dataloader()))
    assert b["features"]["a+bb"].shape == (8, 198)
    rows = [slides[2].spot_ids.index(s) for s in b["spot_id"]]
    np.testing.assert_array_equal(b["features"]["a+bb"].numpy(), fn(slides[2])[rows])


def test_sharding_simulated_ranks_compute_disjoint_chunks(slides, tmp_path: Path) -> None:
    patches = PatchStore(tmp_path, SPEC).build(slides[1])
    store = FeatureStore(tmp_path / "sharded", chunk_size=5)
    n_chunks = store.n_chunks(len(patches))
    encs = [StandInEncoder() for _ in range(3)]
    done = {r: store.extract_shard(patches, encs[r], r, 3, batch_size=5, device="cpu") for r in (1, 2)}
    with pytest.raises(DataError, match="not finished"):
        store.assemble(patches, encs[0])  # rank 0's chunks missing
    done[0] = store.extract_shard(patches, encs[0], 0, 3, batch_size=5, device="cpu")
    for r in range(3):
        assert done[r] == list(range(r, n_chunks, 3))
        assert encs[r].calls == len(done[r])
    feats = store.assemble(patches, encs[0])
    single = FeatureStore(tmp_path / "single", chunk_size=5).extract(
        slides[1], patches, StandInEncoder(), device="cpu"
    )
    np.testing.assert_array_equal(feats.array, single.array)
    assert store.extract_shard(patches, encs[1], 1, 3, device="cpu") == []  # finished: nothing to do
    with pytest.raises(DataError, match="rank"):
        store.extract_shard(patches, encs[1], 3, 3)


def test_features_for_reads_the_method_config(tmp_path: Path) -> None:
    from stbench.methods.base import BatchRequirements, Method

    class NeedsFeatures(Method):
        name = "needs"
        requires = BatchRequirements(
            image=False, features=("encoder",), patch={"out_px": 224, "crop_um": 112}
        )

        def __init__(
            self, n_genes: int, genes=None, encoder: str = "resnet50-trunc", weights: str = "default"
        ):
            super().__init__(n_genes, genes)

    class NoFeatures(Method):
        name = "nofeat"
        requires = BatchRequirements(image=False)

    assert features_for(NoFeatures, {}, tmp_path) is None
    got = features_for(NeedsFeatures, {"encoder": "uni+conch", "weights": "none"}, tmp_path, {"out_px": 16})
    assert list(got) == ["uni+conch"] and got["uni+conch"].encoders == ["uni", "conch"]
    assert list(features_for(NeedsFeatures, {}, tmp_path)) == ["resnet50-trunc"]


def test_random_init_weights_are_keyed_by_their_values(slides, tmp_path: Path) -> None:
    """weights "none" is a label, not an identity: two random inits must not share cached features."""
    p = PatchStore(tmp_path, SPEC).build(slides[0])
    store = FeatureStore(tmp_path)
    assert store.key(p, StandInEncoder(seed=1)) == store.key(p, StandInEncoder(seed=1))
    assert store.key(p, StandInEncoder(seed=1)) != store.key(p, StandInEncoder(seed=2))
    assert store.key(p, StandInEncoder(seed=1, weights_id="file:a")) == store.key(
        p, StandInEncoder(seed=2, weights_id="file:a")
    )


def test_real_resnet50_trunc_extraction_is_cached(slides, tmp_path: Path) -> None:
    """The real registry encoder (random init) through the store: (n, 1024) float32, a second
    extraction with the same encoder does zero forward passes."""
    pytest.importorskip("stbench.encoders.registry")
    from stbench.encoders import build_encoder

    enc = build_encoder("resnet50-trunc", weights="none")
    calls = []
    enc.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    patches = PatchStore(tmp_path, PatchSpec(out_px=32)).build(slides[0])
    feats = FeatureStore(tmp_path).extract(slides[0], patches, enc, batch_size=16, device="cpu")
    assert feats.array.shape == (len(patches), 1024) and feats.index["encoder"] == "resnet50-trunc"
    assert sum(calls) == len(patches) and feats.index["weights_id"] == "none"
    again = FeatureStore(tmp_path).extract(slides[0], patches, enc, device="cpu")
    assert sum(calls) == len(patches) and again.path == feats.path


def test_concurrent_extractions_of_one_slide_compute_it_once(slides, tmp_path: Path) -> None:
    """Two processes/ranks (here threads, each with its own lock handle) extracting the same slide:
    one computes, the other waits and opens the finished store."""
    import threading

    patches = PatchStore(tmp_path, SPEC).build(slides[0])
    encs = [StandInEncoder(), StandInEncoder()]
    out: list = [None, None]

    def run(i: int) -> None:
        out[i] = FeatureStore(tmp_path, chunk_size=4).extract(slides[0], patches, encs[i], device="cpu")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert encs[0].patches_seen + encs[1].patches_seen == len(patches)
    np.testing.assert_array_equal(out[0].array, out[1].array)


def test_kill_between_rename_and_index_is_recovered_without_recompute(slides, tmp_path: Path) -> None:
    patches = PatchStore(tmp_path, SPEC).build(slides[0])
    store = FeatureStore(tmp_path, chunk_size=8)
    ref = store.extract(slides[0], patches, StandInEncoder(), device="cpu")
    expected = np.array(ref.array)
    (ref.path / "index.json").unlink()  # as if killed after features.npy was renamed into place
    enc = StandInEncoder()
    again = store.extract(slides[0], patches, enc, device="cpu")
    assert enc.calls == 0
    np.testing.assert_array_equal(again.array, expected)
    # markers whose rows were lost (partial file deleted) are discarded: everything is recomputed
    (again.path / "index.json").unlink()
    (again.path / "features.npy").unlink()
    enc3 = StandInEncoder()
    third = store.extract(slides[0], patches, enc3, device="cpu")
    assert enc3.patches_seen == len(patches)
    np.testing.assert_array_equal(third.array, expected)
