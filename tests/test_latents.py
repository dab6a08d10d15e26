"""Latent store: values = the VAE's encode of the patches, reuse without re-encoding, keys that change
with the patch spec / weights / dtype, resume after a failure, and the STDataModule FeatureFn contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stbench.data.datamodule import STDataModule
from stbench.data.features import provider_weights_id
from stbench.data.latents import (
    LATENT_KEY,
    LATENT_STD_KEY,
    LatentStore,
    latent_provider,
    latents_for,
    unflatten_latents,
)
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.splits import Fold
from stbench.data.synthetic import generate_synthetic
from stbench.encoders.vae import LatentVAE, build_vae, tiny_vae_config
from stbench.errors import DataError
from stbench.methods.base import BatchRequirements

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = PatchSpec(out_px=32)


class CountingVAE(LatentVAE):
    """The tiny VAE, counting `encode_moments` calls (batches) and the tiles they saw."""

    def __init__(self, seed: int = 0, fail_after: int | None = None) -> None:
        base = build_vae(tiny_vae_config(), seed=seed, name="tiny-vae")
        super().__init__(
            base.vae, weights_id="none", scaling_factor=base.scaling_factor, shift_factor=base.shift_factor,
            name="tiny-vae",
        )  # fmt: skip
        self.calls = 0
        self.tiles = 0
        self.fail_after = fail_after

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.tiles += len(images)
        return super().encode_moments(images)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory):
    root = generate_synthetic(
        tmp_path_factory.mktemp("syn") / "ds", n_slides=3, n_patients=3, spots_per_side=5, n_genes=12
    )
    return SyntheticReader(root).read_all()


def by_hand(vae: LatentVAE, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(np.array(patches)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        m, s = vae.encode_moments(x)
    return m.numpy(), s.numpy()


def test_values_equal_the_vae_encode_and_second_call_reuses(slides, tmp_path: Path) -> None:
    patches = PatchStore(tmp_path, SPEC).build(slides[0])
    vae = CountingVAE()
    n = len(patches)
    lat = LatentStore(tmp_path, dtype="float32", chunk_size=8).extract(
        patches, vae, batch_size=4, device="cpu"
    )
    assert lat.mean.shape == (n, 16, 4, 4) and lat.mean.dtype == np.float32 and lat.shape == (16, 4, 4)
    assert isinstance(lat.mean, np.memmap) and lat.mean.mode == "r"
    assert vae.tiles == n and vae.calls == sum(-(-min(8, n - lo) // 4) for lo in range(0, n, 8))
    mean, std = by_hand(vae, patches.patches)
    np.testing.assert_allclose(lat.mean, mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(lat.std, std, rtol=0, atol=1e-5)
    calls = vae.calls
    again = LatentStore(tmp_path, dtype="float32").extract(patches, vae, device="cpu")  # new instance
    assert vae.calls == calls and again.path == lat.path  # reused: no encode at all
    assert again.index["weights_id"] == "none" and again.index["patch_key"] == patches.key


def test_fp16_storage_option_is_close_and_float32_is_served_without_copy(slides, tmp_path: Path) -> None:
    patches = PatchStore(tmp_path, SPEC).build(slides[0])
    vae = CountingVAE()
    lat = LatentStore(tmp_path, dtype="float16").extract(patches, vae, device="cpu")
    assert lat.mean.dtype == np.float16 and lat.index["dtype"] == "float16"
    mean, _ = by_hand(vae, patches.patches)
    np.testing.assert_allclose(lat.mean.astype(np.float32), mean, rtol=2e-3, atol=2e-3)
    store32 = LatentStore(tmp_path)  # float32 is the default
    assert store32.dtype == "float32" and store32.key(patches, vae) != LatentStore(tmp_path, "float16").key(
        patches, vae
    )
    fn = latent_provider(vae, store32, PatchStore(tmp_path, SPEC), device="cpu")
    served = np.asarray(fn(slides[0]), dtype=np.float32)  # what STDataModule does with it
    assert not served.flags.owndata and not served.flags.writeable  # the read-only memory map, no copy
    np.testing.assert_array_equal(served, store32.open(patches, vae).mean.reshape(len(served), -1))


def test_key_changes_with_patch_spec_and_weights(slides, tmp_path: Path) -> None:
    vae = CountingVAE()
    store = LatentStore(tmp_path)
    p32 = PatchStore(tmp_path, SPEC).build(slides[0])
    p16 = PatchStore(tmp_path, PatchSpec(out_px=16)).build(slides[0])
    pcrop = PatchStore(tmp_path, PatchSpec(out_px=32, crop_px=40)).build(slides[0])
    keys = {store.key(p, vae) for p in (p32, p16, pcrop)}
    assert len(keys) == 3
    assert store.key(p32, CountingVAE(seed=1)) != store.key(p32, vae)  # other random weights
    named = CountingVAE()
    named.weights_id = "hf:stabilityai/stable-diffusion-3.5-large/vae@abc"
    assert store.key(p32, named) != store.key(p32, vae)
    a = store.extract(p32, vae, device="cpu")
    calls = vae.calls
    b = store.extract(p16, vae, device="cpu")  # changed spec -> new store, encoded anew
    assert vae.calls > calls and a.path != b.path and b.mean.shape[1:] == (16, 2, 2)
    with pytest.raises(DataError, match="multiple of the VAE's downsampling"):
        store.extract(PatchStore(tmp_path, PatchSpec(out_px=20)).build(slides[0]), vae, device="cpu")


def test_resume_after_a_failed_extraction(slides, tmp_path: Path) -> None:
    patches = PatchStore(tmp_path, SPEC).build(slides[1])
    store = LatentStore(tmp_path, "float32", chunk_size=4)
    with pytest.raises(RuntimeError, match="killed"):
        store.extract(patches, CountingVAE(fail_after=3), batch_size=4, device="cpu")
    assert store.open(patches, CountingVAE()) is None  # not finished: never opened as done
    vae = CountingVAE()
    lat = store.extract(patches, vae, batch_size=4, device="cpu")
    assert vae.calls == store.n_chunks(len(patches)) - 3  # only the missing chunks
    np.testing.assert_allclose(lat.mean, by_hand(vae, patches.patches)[0], rtol=0, atol=1e-5)


class NeedsLatents:
    name = "needs-latents"
    requires = BatchRequirements(image=False, features=("latents", "latents_std"), patch={"crop_px": 40})

    def __init__(self, n_genes: int, vae: str = "default", latent_px: int = 256) -> None: ...


def test_latents_for_serves_batches_through_the_datamodule(slides, tmp_path: Path) -> None:
    built: list[str] = []

    def build(source: str) -> LatentVAE:
        built.append(source)
        return CountingVAE()

    assert latents_for(type("X", (), {"requires": BatchRequirements()}), {}, tmp_path) is None
    fns = latents_for(NeedsLatents, {"vae": "tiny", "latent_px": 32}, tmp_path, device="cpu", build=build)
    assert list(fns) == [LATENT_KEY, LATENT_STD_KEY]
    fold = Fold(
        0, "f", (slides[0].name, slides[1].name), (), (slides[2].name,), unit="patient", val_fraction=0.0
    )
    dm = STDataModule(slides, fold, features=fns, gene_rule="top_var", gene_n=5, batch_size=8)
    dm.setup("fit")
    assert built == ["tiny"]  # one VAE shared by both keys
    assert provider_weights_id(dm, LATENT_KEY) == "none"
    assert fns[LATENT_KEY].latent_shape() == (16, 4, 4)
    b = next(iter(dm.test_dataloader()))
    assert b["features"][LATENT_KEY].shape == (8, 16 * 4 * 4)
    z = unflatten_latents(b["features"][LATENT_KEY], 16)
    spec = PatchSpec(out_px=32, crop_px=40)  # the method's crop, latent_px as the output side
    lat = LatentStore(tmp_path).open(PatchStore(tmp_path, spec).build(slides[2]), CountingVAE())
    assert lat is not None
    rows = [slides[2].spot_ids.index(s) for s in b["spot_id"]]
    np.testing.assert_array_equal(z.numpy(), lat.mean[rows].astype(np.float32))
    np.testing.assert_array_equal(
        unflatten_latents(b["features"][LATENT_STD_KEY]).numpy(), lat.std[rows].astype(np.float32)
    )


def test_provider_and_unflatten_checks(slides, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="latent part"):
        latent_provider(CountingVAE(), LatentStore(tmp_path), PatchStore(tmp_path, SPEC), part="logvar")
    with pytest.raises(DataError, match="latent dtype"):
        LatentStore(tmp_path, dtype="bfloat16")
    with pytest.raises(ValueError, match="square latent channels"):
        unflatten_latents(torch.zeros(2, 16 * 12), 16)
