"""Patch store: geometry (centre, scale, edges), quality records, caching and kill safety.

Synthetic slides are drawn here with markers at known (sub-pixel) spot centres; the real-data
tests cut Her2ST B4 and compare patches with the source JPEG pixel by pixel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stbench.data import patches as patches_mod
from stbench.data.image import SlideImage
from stbench.data.patches import PatchSpec, PatchStore, SlidePatches, background_fraction, laplacian_variance
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError
from tests.conftest import HER2ST

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
GREY = 120


def make_slide(
    tmp_path: Path,
    img: np.ndarray | None,
    coords,
    *,
    name: str = "S1",
    mpp: float | None = 0.5,
    diameter: float | None = 55.0,
    fmt: str = "png",
) -> Slide:
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    n = len(coords)
    ids = [f"spot{i}" for i in range(n)]
    adata = make_adata(np.ones((n, 2)), ids, ["g1", "g2"], coords)
    image = None
    if img is not None:
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "tif":
            import tifffile

            tifffile.imwrite(path, img)
        else:
            Image.fromarray(img).save(path)
        image = SlideImage(path)
    return Slide(
        name=name,
        patient="P1",
        adata=adata,
        image=image,
        mpp=mpp,
        spot_diameter_um=diameter,
        platform="synthetic",
        source=str(tmp_path / "counts.tsv"),
    )


def grey_image(h: int = 160, w: int = 200) -> np.ndarray:
    return np.full((h, w, 3), GREY, dtype=np.uint8)


# ---- geometry ------------------------------------------------------------------------------
@pytest.mark.parametrize("out_px", [21, 63])  # scale 1 and 3x upsampling, odd so a middle pixel exists
def test_centre_pixel_is_the_marker(tmp_path: Path, out_px: int) -> None:
    img = grey_image()
    centres = [(40, 30), (101, 77), (150, 120)]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for (x, y), c in zip(centres, colours, strict=True):
        img[y, x] = c  # row = y, column = x
    slide = make_slide(tmp_path, img, centres)
    sp = PatchStore(tmp_path / "cache", PatchSpec(out_px=out_px, crop_px=21)).build(slide)
    assert sp.patches.shape == (3, out_px, out_px, 3) and sp.patches.dtype == np.uint8
    mid = out_px // 2
    for i, c in enumerate(colours):
        assert tuple(sp[i][mid, mid]) == c
        assert tuple(sp[i][0, 0]) == (GREY,) * 3
    if out_px == 21:  # scale 1: the patch is exactly the image window around the marker
        x, y = centres[1]
        np.testing.assert_array_equal(sp[1], img[y - 10 : y + 11, x - 10 : x + 11])


@pytest.mark.parametrize(("crop_px", "out_px"), [(41, 82), (41, 41), (81, 27), (40, 224)])
def test_sub_pixel_centre_is_the_patch_centre(tmp_path: Path, crop_px: int, out_px: int) -> None:
    """A Gaussian blob drawn at a sub-pixel spot centre lands at the patch's geometric centre."""
    h, w = 300, 300
    centres = [(60.3, 70.7), (200.5, 80.25), (130.0, 220.0)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w), dtype=np.float64)
    for cx, cy in centres:  # pixel-index frame: pixel (i, j) sits at coordinate (i, j)
        img += 250 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 3.0**2))
    rgb = np.repeat(np.clip(img, 0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    sp = PatchStore(tmp_path / "c", PatchSpec(out_px=out_px, crop_px=crop_px)).build(
        make_slide(tmp_path, rgb, centres)
    )
    jj = np.arange(out_px) + 0.5  # continuous centre of output pixel j
    for i in range(len(centres)):
        wgt = sp[i][..., 0].astype(np.float64)
        cx = (wgt.sum(axis=0) * jj).sum() / wgt.sum()
        cy = (wgt.sum(axis=1) * jj).sum() / wgt.sum()
        tol = 0.06 * out_px / crop_px  # 0.06 source pixels, in output pixels
        assert abs(cx - out_px / 2) < tol and abs(cy - out_px / 2) < tol, (i, cx, cy)


def test_crop_um_scales_by_mpp(tmp_path: Path) -> None:
    img = grey_image(300, 300)
    img[100:200, 100:200] = (200, 30, 30)  # a 100 px = 50 um square centred on the spot
    slide = make_slide(tmp_path, img, [(149.5, 149.5)], mpp=0.5, diameter=55.0)
    assert PatchSpec(crop_um=50).crop_size_px(slide) == pytest.approx(100.0)
    assert PatchSpec().crop_size_px(slide) == pytest.approx(110.0)  # spot diameter 55 um
    assert PatchSpec(crop_px=64).crop_size_px(slide) == 64.0
    store = PatchStore(tmp_path / "c", PatchSpec(out_px=32, crop_um=50))
    sp = store.build(slide)
    assert sp.crop_size_px == pytest.approx(100.0)
    assert sp.index["out_mpp"] == pytest.approx(50 / 32)
    assert (np.abs(sp[0][2:-2, 2:-2].astype(int) - (200, 30, 30)) <= 1).all()  # the square fills it
    wide = PatchStore(tmp_path / "c", PatchSpec(out_px=32, crop_um=100)).build(slide)[0]
    assert (np.abs(wide[10:22, 10:22].astype(int) - (200, 30, 30)) <= 1).all()  # middle half = square
    assert (wide[:6, :6] == GREY).all() and (wide[-6:, -6:] == GREY).all()


def test_spec_validation_and_missing_scale(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not both"):
        PatchSpec(crop_um=50, crop_px=64)
    with pytest.raises(DataError, match="edge"):
        PatchSpec(edge="wrap")
    with pytest.raises(DataError, match="out_px"):
        PatchSpec(out_px=0)
    no_mpp = make_slide(tmp_path, grey_image(), [(50, 50)], mpp=None)
    with pytest.raises(DataError) as err:
        PatchSpec(crop_um=50).crop_size_px(no_mpp)
    assert err.value.field == "mpp" and err.value.slide == "S1"
    assert PatchSpec(crop_px=32).crop_size_px(no_mpp) == 32.0


def test_slide_without_image_is_named(tmp_path: Path) -> None:
    slide = make_slide(tmp_path, None, [(5, 5)], name="NoImg")
    with pytest.raises(DataError) as err:
        PatchStore(tmp_path / "c", PatchSpec(crop_px=16)).build(slide)
    assert err.value.slide == "NoImg" and err.value.field == "image"
    assert "NoImg" in str(err.value) and "image" in str(err.value)


def test_edge_spots_padded_and_flagged(tmp_path: Path) -> None:
    img = grey_image(100, 100)
    img[2, 3] = (255, 0, 0)
    img[50, 50] = (0, 255, 0)
    slide = make_slide(tmp_path, img, [(3, 2), (50, 50)])
    sp = PatchStore(tmp_path / "c", PatchSpec(out_px=21, crop_px=21, edge="pad")).build(slide)
    assert sp.at_edge.tolist() == [True, False]
    assert tuple(sp[0][10, 10]) == (255, 0, 0)  # the centre still holds at the edge
    assert (sp[0][:8] == 255).all() and (sp[0][:, :7] == 255).all()  # outside the image: white
    np.testing.assert_array_equal(sp[0][8:, 7:], img[:13, :14])  # the rest is the image corner
    assert sp.background_fraction[0] > sp.background_fraction[1]
    assert sp.quality["shift_x"].tolist() == [0.0, 0.0]

    shifted = PatchStore(tmp_path / "c", PatchSpec(out_px=21, crop_px=21, edge="shift")).build(slide)
    assert shifted.key != sp.key and shifted.at_edge.tolist() == [True, False]
    assert not (shifted[0] == 255).all(axis=-1).any()  # no padding at all
    assert tuple(shifted[0][2, 3]) == (255, 0, 0)  # window moved to the image corner
    assert shifted.quality[["shift_x", "shift_y"]].iloc[0].tolist() == [7.0, 8.0]
    assert shifted.flags(exclude_edge=True)["keep"].tolist() == [False, True]


# ---- quality ---------------------------------------------------------------------------------
def test_background_and_blur_are_recorded_not_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = np.full((120, 240, 3), 255, dtype=np.uint8)  # white glass on the left
    img[:, 80:160] = (225, 215, 230)  # Her2ST-like lavender glass in the middle
    img[:, 160:] = rng.integers(40, 200, size=(120, 80, 3), dtype=np.uint8)  # textured "tissue"
    slide = make_slide(tmp_path, img, [(40, 60), (120, 60), (200, 60)])
    sp = PatchStore(tmp_path / "c", PatchSpec(out_px=32, crop_px=32)).build(slide)
    assert sp.background_fraction.dtype == np.float32 and sp.blur.dtype == np.float32
    assert sp.background_fraction[0] == 1.0 and sp.background_fraction[1] == 1.0
    assert sp.background_fraction[2] < 0.05
    assert sp.blur[0] == 0.0 and sp.blur[2] > 100 * max(sp.blur[1], 1e-3)
    flags = sp.flags(background_max=0.9, blur_min=1.0)
    assert list(flags.index) == slide.spot_ids  # every spot is reported, none silently gone
    assert flags["is_background"].tolist() == [True, True, False]
    assert flags["is_blurry"].tolist() == [True, True, False]
    assert flags["keep"].tolist() == [False, False, True]
    assert sp.flags(background_max=1.0)["keep"].all()


def test_quality_functions_directly() -> None:
    white = np.full((16, 16, 3), 255, dtype=np.uint8)
    assert background_fraction(white) == 1.0
    purple = np.full((16, 16, 3), (150, 90, 200), dtype=np.uint8)
    assert background_fraction(purple) == 0.0
    half = white.copy()
    half[:8] = purple[:8]
    assert background_fraction(half) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    assert laplacian_variance(white) == 0.0
    textured = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(textured).resize((4, 4)).resize((16, 16), Image.Resampling.BILINEAR))
    assert laplacian_variance(textured) > 10 * laplacian_variance(smooth)


def test_non_uint8_single_channel_image(tmp_path: Path) -> None:
    img = np.tile((np.arange(64) * 500).astype(np.uint16), (64, 1))  # DAPI-like ramp along x
    slide = make_slide(tmp_path, img, [(32, 32)], fmt="tif")
    sp = PatchStore(tmp_path / "c", PatchSpec(out_px=9, crop_px=9)).build(slide)
    assert sp.patches.shape == (1, 9, 9, 3) and sp.patches.dtype == np.uint8
    centre = sp[0][4, 4]
    assert centre[0] == centre[1] == centre[2]  # grey repeated into RGB
    assert abs(int(centre[0]) - 32 * 500 * 255 / 31500) <= 2  # scaled so the top (99.9 pct) is 255
    assert sp[0][4, 0, 0] < centre[0] < sp[0][4, 8, 0]


# ---- cache -----------------------------------------------------------------------------------
@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    original = SlideImage.read

    def counting(self: SlideImage) -> np.ndarray:
        calls.append(self.path)
        return original(self)

    monkeypatch.setattr(SlideImage, "read", counting)
    return calls


def test_cache_reuse_and_rebuild(tmp_path: Path, count_reads: list[Path]) -> None:
    img = grey_image()
    slide = make_slide(tmp_path, img, [(40, 40), (100, 90)])
    store = PatchStore(tmp_path / "cache", PatchSpec(out_px=16, crop_px=20))
    first = store.build(slide)
    assert len(count_reads) == 1  # one decode for all spots
    again = store.build(slide)
    assert len(count_reads) == 1 and again.key == first.key and again.path == first.path
    opened = store.open(slide)
    assert isinstance(opened, SlidePatches) and len(opened) == 2 and len(count_reads) == 1
    assert isinstance(opened.patches, np.memmap) and not opened.patches.flags.writeable
    assert opened.spot_ids == slide.spot_ids and opened.index["slide"] == "S1"
    assert first.path.parent == tmp_path / "cache" and first.key in first.path.name
    assert {p.name for p in first.path.iterdir()} == {"patches.npy", "index.json", "quality.csv"}

    other = PatchStore(tmp_path / "cache", PatchSpec(out_px=24, crop_px=20)).build(slide)
    assert len(count_reads) == 2 and other.key != first.key and other.patches.shape[1] == 24

    moved = make_slide(tmp_path, img, [(40, 40), (100, 91)])  # same image, one spot moved
    assert store.key(moved) != first.key
    os.utime(slide.image.path, ns=(1, 1))  # image file changed (mtime) -> new key
    assert store.key(slide) != first.key


def test_pickles_as_a_path_not_a_copy(tmp_path: Path) -> None:
    import pickle

    slide = make_slide(tmp_path, grey_image(300, 300), [(100, 100), (200, 150)])
    sp = PatchStore(tmp_path / "cache", PatchSpec(out_px=128, crop_px=64)).build(slide)
    blob = pickle.dumps(sp)
    assert len(blob) < sp.patches.nbytes / 4  # DataLoader workers re-map the file
    back = pickle.loads(blob)
    assert isinstance(back.patches, np.memmap) and back.spot_ids == sp.spot_ids
    np.testing.assert_array_equal(back[1], sp[1])


def test_open_before_build_names_slide(tmp_path: Path) -> None:
    slide = make_slide(tmp_path, grey_image(), [(40, 40)])
    with pytest.raises(DataError) as err:
        PatchStore(tmp_path / "cache", PatchSpec(crop_px=20)).open(slide)
    assert err.value.slide == "S1" and err.value.field == "patches"


def test_kill_leaves_nothing_that_looks_complete(
    tmp_path: Path, count_reads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    slide = make_slide(tmp_path, grey_image(), [(40, 40), (100, 90), (150, 30)])
    store = PatchStore(tmp_path / "cache", PatchSpec(out_px=16, crop_px=20))
    path = store.path(slide)

    real_cut, seen = patches_mod._cut, []

    def dying_cut(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed half-way through the extraction
        return real_cut(*args, **kwargs)

    monkeypatch.setattr(patches_mod, "_cut", dying_cut)
    with pytest.raises(KeyboardInterrupt):
        store.build(slide)
    assert not (path / "patches.npy").exists() and not (path / "index.json").exists()
    assert not list(path.glob(".*.tmp"))
    with pytest.raises(DataError):
        store.open(slide)
    monkeypatch.setattr(patches_mod, "_cut", real_cut)

    # A hard kill (no cleanup) leaves a temp file behind: it is ignored, then cleaned and rebuilt.
    (path / ".patches.npy.dead.tmp").write_bytes(b"\x93NUMPY half written")
    sp = store.build(slide)
    assert len(sp) == 3 and not list(path.glob(".*.tmp")) and len(count_reads) == 2
    # A store whose index.json never got written (killed before the last step) is rebuilt.
    (path / "index.json").unlink()
    assert len(store.build(slide)) == 3 and len(count_reads) == 3
    # A truncated patches file does not pass as complete either.
    (path / "patches.npy").write_bytes((path / "patches.npy").read_bytes()[:200])
    assert len(store.build(slide)) == 3 and len(count_reads) == 4


# ---- real data -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def b4(tmp_path_factory: pytest.TempPathFactory):
    if not HER2ST.is_dir():
        pytest.skip(f"real Her2ST data not found at {HER2ST}")
    from stbench.data.readers.her2st import Her2STReader

    slide = Her2STReader(HER2ST).read_slide("B4")
    store = PatchStore(tmp_path_factory.mktemp("patches"), PatchSpec())
    sp = store.build(slide)
    return slide, sp, slide.image.read()


def _bilinear(arr: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample (H, W, 3) at pixel-index coordinates (pixel (i, j) centred at (i, j))."""
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    dx, dy = (x - x0)[:, None], (y - y0)[:, None]

    def px(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return arr[yy, xx].astype(np.float64)

    return (
        px(y0, x0) * (1 - dx) * (1 - dy)
        + px(y0, x0 + 1) * dx * (1 - dy)
        + px(y0 + 1, x0) * (1 - dx) * dy
        + px(y0 + 1, x0 + 1) * dx * dy
    )


@pytest.mark.real_data
def test_her2st_b4_patch_centres_match_the_image(b4) -> None:
    slide, sp, arr = b4
    out = 224
    assert sp.patches.shape == (slide.n_spots, out, out, 3) and sp.patches.dtype == np.uint8
    assert sp.spot_ids == slide.spot_ids
    assert sp.crop_size_px == pytest.approx(100.0 / slide.mpp)  # 100 um spot, ~145 px
    x, y = slide.coords[:, 0], slide.coords[:, 1]
    s, h = sp.crop_size_px, sp.crop_size_px / 2
    h_img, w_img = arr.shape[:2]
    inside = (x + 0.5 - h >= 0) & (y + 0.5 - h >= 0) & (x + 0.5 + h <= w_img) & (y + 0.5 + h <= h_img)
    np.testing.assert_array_equal(sp.at_edge, ~inside)

    centre = (
        sp.patches[:, out // 2 - 1 : out // 2 + 1, out // 2 - 1 : out // 2 + 1]
        .astype(float)
        .mean(axis=(1, 2))
    )
    # 1) the middle 2x2 output pixels sample exactly x +- s/(2*out): agree to resampling rounding
    q = 0.5 * s / out
    exact = np.mean([_bilinear(arr, x + a, y + b) for a in (-q, q) for b in (-q, q)], axis=0)
    assert np.abs(centre - exact).max() <= 1.5
    # 2) against the source at (pixel_x, pixel_y) itself: close, and closer than a 1-px shift or x/y swap
    at = np.abs(centre - _bilinear(arr, x, y)).mean(axis=1)
    off = np.abs(centre - _bilinear(arr, x + 1, y + 1)).mean(axis=1)
    assert np.median(at) <= 1.0 and np.percentile(at, 90) <= 3.0
    assert np.median(at) < 0.5 * np.median(off)
    if y.max() < w_img - 1 and x.max() < h_img - 1:
        swapped = np.abs(centre - _bilinear(arr, y, x)).mean(axis=1)
        assert np.median(swapped) > 10 * max(np.median(at), 0.5)


@pytest.mark.real_data
def test_her2st_b4_patches_are_tissue(b4) -> None:
    slide, sp, arr = b4
    # every kept Her2ST spot is under tissue: patches are mostly not glass
    assert np.median(sp.background_fraction) < 0.05
    assert (sp.background_fraction < 0.5).mean() >= 0.95
    assert sp.flags()["keep"].all() and len(sp.flags()) == slide.n_spots
    # while the glass in the image corner is background by the same rule
    c = int(sp.crop_size_px)
    assert background_fraction(arr[:c, :c]) > 0.9 and background_fraction(arr[-c:, -c:]) > 0.9
    # tissue is textured; an all-glass crop resampled the same way is not
    glass = np.asarray(Image.fromarray(arr[:c, :c]).resize((224, 224), Image.Resampling.BILINEAR))
    assert np.median(sp.blur) > 3 * laplacian_variance(glass)


def _grid_average(slide: Slide, arr: np.ndarray, shift: float = 0.0, out: int = 64) -> tuple[np.ndarray, int]:
    """Mean grey glass patch over every ST array position (fitted from the spots), 2 diameters wide.

    Her2ST's glass shows the printed array spots as faint grey discs; averaging hundreds of glass
    crops cut at the grid positions makes that disc visible, an alignment check independent of
    the H&E content."""
    obs = slide.adata.obs
    design = np.c_[obs["array_x"], obs["array_y"], np.ones(slide.n_spots)]
    fit = np.linalg.lstsq(design, slide.coords, rcond=None)[0]  # array (x, y) -> full-res px
    gx, gy = np.meshgrid(np.arange(1, 34) + shift, np.arange(1, 36) + shift)
    grid = np.c_[gx.ravel(), gy.ravel(), np.ones(gx.size)] @ fit
    crop, (h, w) = 2 * slide.spot_diameter_px, arr.shape[:2]
    stack = []
    for c in grid:
        if crop < c[0] < w - crop and crop < c[1] < h - crop:
            patch = np.asarray(patches_mod._cut(arr, c, crop, out, "pad")[0])  # the store's own cutter
            if background_fraction(patch) > 0.97:
                stack.append(patch.astype(np.float32).mean(axis=-1))
    return np.mean(stack, axis=0), len(stack)


@pytest.mark.real_data
def test_her2st_b4_array_imprints_are_centred(b4) -> None:
    """Crops cut at the array grid implied by the spot coordinates centre the printed spot discs."""
    slide, _, arr = b4
    mean, n = _grid_average(slide, arr)
    out = mean.shape[0]
    assert n > 200
    yy, xx = np.mgrid[0:out, 0:out] + 0.5 - out / 2
    r = np.hypot(xx, yy) * (2 * slide.spot_diameter_px / out) / slide.spot_diameter_px  # in diameters
    contrast = mean[r > 0.75].mean() - mean[r < 0.3].mean()
    assert contrast > 1.0  # a darker disc sits in the middle
    dark = np.clip(np.percentile(mean, 90) - mean, 0, None)
    off_x = (dark * xx).sum() / dark.sum() * 2 * slide.spot_diameter_px / out
    off_y = (dark * yy).sum() / dark.sum() * 2 * slide.spot_diameter_px / out
    assert abs(off_x) < 12 and abs(off_y) < 12, (off_x, off_y)  # full-res px (~8 um of a 145 px spot)
    between, _ = _grid_average(slide, arr, shift=0.5)  # half a step off: no disc in the middle
    assert between[r > 0.75].mean() - between[r < 0.3].mean() < 0.5 * contrast


@pytest.mark.real_data
def test_her2st_b4_overlay_picture(b4) -> None:
    """Writes docs/img/her2st_B4_spots.png: spots (100 um circles) on the slide, example patches,
    the averaged array imprint, and a full-resolution zoom."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    slide, sp, arr = b4
    f, r_full = 8, slide.spot_diameter_px / 2
    thumb = np.asarray(Image.fromarray(arr).reduce(f))
    fig = plt.figure(figsize=(13, 7.2), dpi=90)
    ax = fig.add_axes((0.0, 0.0, 0.46, 0.93))
    # pixel-index frame: thumbnail pixel i covers full-res [f*i, f*(i+1)), so coordinate c -> (c+0.5)/f-0.5
    ax.imshow(thumb, extent=(-0.5, thumb.shape[1] - 0.5, thumb.shape[0] - 0.5, -0.5))
    to_thumb = (slide.coords + 0.5) / f - 0.5
    for cx, cy in to_thumb:
        ax.add_patch(Circle((cx, cy), r_full / f, fill=False, lw=0.6, ec="lime"))
    order = np.argsort(sp.background_fraction)
    examples = [int(order[i]) for i in np.linspace(0, len(order) - 1, 8).round().astype(int)]
    for k, i in enumerate(examples):
        cx, cy = to_thumb[i]
        ax.add_patch(Circle((cx, cy), r_full / f, fill=False, lw=1.5, ec="yellow"))
        ax.text(cx + r_full / f, cy - r_full / f, str(k + 1), color="yellow", fontsize=9, weight="bold")
    zx, zy = 1300, 6300  # full-res zoom window (tissue), drawn as a box on the thumbnail
    ax.add_patch(
        plt.Rectangle(
            ((zx + 0.5) / f - 0.5, (zy + 0.5) / f - 0.5), 1200 / f, 1200 / f, fill=False, ec="cyan", lw=1.2
        )
    )
    ax.set_title(
        f"Her2ST B4: {slide.n_spots} spots; circles = 100 um spot ({2 * r_full:.0f} px at "
        f"{slide.mpp:.3f} um/px); x = pixel_x (horizontal)",
        fontsize=9,
    )
    ax.set_axis_off()
    w_ax = 0.125
    for k, i in enumerate(examples):
        pax = fig.add_axes((0.475 + (w_ax + 0.01) * (k % 4), 0.67 - 0.33 * (k // 4), w_ax, 0.24))
        pax.imshow(sp[i])
        pax.plot([111.5], [111.5], "+", color="lime", ms=8)
        pax.set_title(
            f"{k + 1}: {sp.spot_ids[i]}  bg {sp.background_fraction[i]:.2f}  blur {sp.blur[i]:.0f}",
            fontsize=7,
        )
        pax.set_axis_off()
    fig.text(0.475, 0.955, "224 px patches (crop = 100 um spot), + = spot centre", fontsize=9)
    mean, n = _grid_average(slide, arr)
    iax = fig.add_axes((0.475, 0.02, w_ax, 0.24))
    iax.imshow(mean, cmap="gray")
    iax.add_patch(
        Circle(
            (mean.shape[0] / 2 - 0.5, mean.shape[0] / 2 - 0.5),
            mean.shape[0] / 4,
            fill=False,
            ec="lime",
            lw=0.8,
        )
    )
    iax.set_title(f"glass at {n} array positions,\naveraged: printed spot centred", fontsize=7)
    iax.set_axis_off()
    zoom = arr[zy : zy + 1200, zx : zx + 1200]
    zax = fig.add_axes((0.475 + w_ax + 0.01, 0.02, 0.24, 0.24))
    zax.imshow(
        np.asarray(Image.fromarray(zoom).reduce(3)), extent=(zx - 0.5, zx + 1199.5, zy + 1199.5, zy - 0.5)
    )
    for cx, cy in slide.coords:
        if zx < cx < zx + 1200 and zy < cy < zy + 1200:
            zax.add_patch(Circle((cx, cy), r_full, fill=False, ec="lime", lw=0.8))
    zax.set_xlim(zx - 0.5, zx + 1199.5)
    zax.set_ylim(zy + 1199.5, zy - 0.5)
    zax.set_title("full-resolution zoom (cyan box)", fontsize=7)
    zax.set_axis_off()
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    target = DOCS_IMG / "her2st_B4_spots.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    # a palette PNG keeps the committed picture small
    Image.open(buf).convert("RGB").quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(
        target, optimize=True
    )
    assert target.exists() and target.stat().st_size < 500_000
