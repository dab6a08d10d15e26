"""Named datasets: what they are, where they come from, how they are read and evaluated.

A card never contains data; `stbench data prepare NAME` fetches (or links, with --source) the
public files into the data root, then the card's reader reads them in their published layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stbench.errors import UnknownNameError


@dataclass(frozen=True)
class Download:
    """One public file of a dataset. sha256 None = not pinned yet (recorded at prepare time)."""

    url: str
    filename: str
    sha256: str | None = None
    extract: bool = False
    kind: str = "http"  # "http" (urllib, checksum) or "git" (shallow clone of a public repository)


COUNTS = ("raw", "normalized")


@dataclass(frozen=True)
class DatasetCard:
    name: str
    title: str
    reader: str
    platform: str
    tissue: str
    n_slides: int | None
    n_patients: int | None
    source_url: str
    how_to_get: str
    access: str
    licence: str
    citation: str
    default_protocol: str
    reader_options: dict[str, Any] = field(default_factory=dict)
    downloads: tuple[Download, ...] = ()
    eval_pool: tuple[str, ...] | None = None  # fixed evaluation pool (HINGE on Her2ST)
    fold_groups: tuple[tuple[str, ...], ...] | None = None  # explicit k-fold groups (DiffBulk)
    spot_diameter_um: float | None = None
    notes: str = ""
    # Default pseudo-bulk tiling (TilingSpec fields, stbench.data.pseudobulk): when set, every slide is
    # turned into tiles after reading. reader_options["tiling"] (a dict merged over this, True for
    # the defaults, False/None for no tiling) overrides it; see docs/pseudobulk.md.
    pseudobulk: dict[str, Any] | None = None
    # What the expression values are: "raw" counts (the default; readers refuse values that look
    # normalised) or "normalized" (already normalised / log values: the protocol's target transform
    # is skipped, method "none", and every result row records it). See docs/protocols.md.
    counts: str = "raw"

    def __post_init__(self) -> None:
        if self.counts not in COUNTS:
            raise ValueError(f"dataset {self.name!r}: counts must be one of {COUNTS}, got {self.counts!r}")

    def reader_kwargs(self) -> dict[str, Any]:
        """Options the reader is built with: reader_options without "tiling", plus the `counts`
        declaration when the values are declared normalised (raw keeps the options, and so the
        slide cache keys, as they were)."""
        options = {k: v for k, v in self.reader_options.items() if k != "tiling"}
        if self.counts != "raw":
            options["counts"] = self.counts
        return options

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "platform": self.platform,
            "tissue": self.tissue,
            "slides": self.n_slides,
            "patients": self.n_patients,
            "reader": self.reader,
            "protocol": self.default_protocol,
            "access": self.access,
            "tiles": f"{self.pseudobulk.get('aggregate', 'transcripts')} tiles" if self.pseudobulk else "-",
        }


_HER2ST_POOL = ("A1", "B1", "C1", "D1", "E1", "F1", "G1", "H1")

CATALOG: dict[str, DatasetCard] = {}


def register_dataset(card: DatasetCard) -> DatasetCard:
    CATALOG[card.name] = card
    return card


def get_card(name: str) -> DatasetCard:
    if name not in CATALOG:
        raise UnknownNameError("dataset", name, list(CATALOG))
    return CATALOG[name]


register_dataset(
    DatasetCard(
        name="her2st",
        title="HER2-positive breast cancer, original ST (Andersson et al. 2021)",
        reader="her2st",
        platform="st",
        tissue="breast (HER2+ IDC)",
        n_slides=36,
        n_patients=8,
        source_url="https://github.com/almaan/her2st",
        how_to_get=(
            "git clone https://github.com/almaan/her2st (data/ST-cnts, ST-spotfiles, ST-imgs, ST-pat); "
            "the same files are on Zenodo (doi:10.5281/zenodo.4751624). Then: "
            "stbench data prepare her2st --source /path/to/her2st"
        ),
        access="public",
        licence="see the repository (research use); cite the paper",
        citation="Andersson A. et al. Spatial deconvolution of HER2-positive breast cancer delineates tumor-"
        "associated cell type interactions. Nat Commun 12, 6012 (2021).",
        default_protocol="loso",
        downloads=(Download("https://github.com/almaan/her2st", "her2st", kind="git"),),
        eval_pool=_HER2ST_POOL,
        spot_diameter_um=100.0,
        notes="36 sections of 8 patients (A-H); patient = section letter. Spots 100 um, 200 um apart.",
    )
)

register_dataset(
    DatasetCard(
        name="cscc",
        title="Cutaneous squamous cell carcinoma, ST (Ji et al. 2020)",
        reader="cscc",
        platform="st",
        tissue="skin (cSCC)",
        n_slides=12,
        n_patients=4,
        source_url="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE144240",
        how_to_get="Download GSE144240_RAW.tar from GEO, extract; stbench data prepare cscc --source DIR",
        access="public",
        licence="GEO (public domain data; cite the paper)",
        citation="Ji A.L. et al. Multimodal analysis of composition and spatial architecture in human "
        "squamous cell carcinoma. Cell 182, 497-514 (2020).",
        default_protocol="loso",
        downloads=(
            Download(
                "https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSE144240&format=file",
                "GSE144240_RAW.tar",
                extract=True,
            ),
        ),
        spot_diameter_um=150.0,
        notes="4 patients x 3 replicates (P2, P5, P9, P10). Spots 150 um, 110 um apart (HINGE Table S1).",
    )
)

register_dataset(
    DatasetCard(
        name="kidney",
        title="Human kidney Visium atlas (Lake et al. 2023)",
        reader="visium",
        platform="visium",
        tissue="kidney",
        n_slides=23,
        n_patients=22,
        source_url="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE171406",
        how_to_get="Download the Space Ranger outs and full-resolution images (KPMP atlas / GEO GSE171406); "
        "one folder per slide with outs/; stbench data prepare kidney --source DIR",
        access="public",
        licence="KPMP data use agreement / GEO",
        citation="Lake B.B. et al. An atlas of healthy and injured cell states and niches in the human "
        "kidney. Nature 619, 585-594 (2023).",
        default_protocol="loso",
        spot_diameter_um=55.0,
    )
)

# DiffBulk's tiles: 224 px at 20x (0.5 um/px) = 112 um, no overlap; thresholds at their defaults.
_DIFFBULK_TILES = {"tile_px": 224, "tile_mpp": 0.5}

_HEST_HOWTO = (
    "HEST-1k is on the Hugging Face hub (MahmoodLab/hest, gated: accept the terms on "
    "https://huggingface.co/datasets/MahmoodLab/hest, then huggingface-cli download with your token). "
    "Put st/, wsis/, patches/, metadata/ (and HEST-Bench splits/) in one folder; "
    "stbench data prepare {name} --source DIR"
)

for _name, _title, _tissue, _n, _note in (
    (
        "hest-bowel",
        "HEST-1k bowel Xenium sections (DiffBulk)",
        "bowel",
        3,
        "541 genes, 16,816 tiles. The paper does not name its 3 samples; HEST-1k's human bowel Xenium "
        "sections are TENX111, TENX114, TENX139, TENX147, TENX148, TENX149 (reader option ids picks them)",
    ),
    (
        "hest-pancreas",
        "HEST-1k pancreas Xenium sections (DiffBulk)",
        "pancreas",
        3,
        "538 genes, 7,501 tiles. HEST-1k's human pancreas Xenium sections are TENX116 (538 genes), "
        "TENX126 and TENX140",
    ),
):
    register_dataset(
        DatasetCard(
            name=_name,
            title=_title,
            reader="hest",
            platform="xenium",
            tissue=_tissue,
            n_slides=_n,
            n_patients=_n,
            source_url="https://huggingface.co/datasets/MahmoodLab/hest",
            how_to_get=_HEST_HOWTO.format(name=_name),
            access="gated (Hugging Face terms)",
            licence="CC BY-NC-SA 4.0",
            default_protocol="diffbulk",
            citation="Jaume G. et al. HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image "
            "Analysis. NeurIPS Datasets and Benchmarks (2024).",
            notes=f"Xenium pseudo-bulk 224 px tiles at ~0.5 um/px from transcripts/<id>_transcripts.parquet "
            f"(he_x/he_y); {_note} (DiffBulk paper).",
            spot_diameter_um=112.0,
            pseudobulk={**_DIFFBULK_TILES, "aggregate": "transcripts"},
        )
    )

register_dataset(
    DatasetCard(
        name="crunchdao-bowel",
        title="CrunchDAO Autoimmune Crunch bowel Xenium (DiffBulk)",
        reader="crunchdao",
        platform="xenium",
        tissue="bowel (IBD)",
        n_slides=7,
        n_patients=None,
        source_url="https://hub.crunchdao.com/competitions/autoimmune-crunch-1",
        how_to_get="Register for the CrunchDAO Autoimmune Crunch (Broad-1), download the Crunch 1 data "
        "(one SpatialData <sample>.zarr per section: UC1_NI, UC1_I, UC6_NI, UC6_I, UC7_I, UC9_I, DC1, DC5; "
        "crunch1_min suffices) into one folder; stbench data prepare crunchdao-bowel --source DIR",
        access="registration required",
        licence="competition terms",
        citation="Broad Institute / CrunchDAO Autoimmune Disease Machine Learning Challenge (2025).",
        default_protocol="diffbulk",
        notes="460 genes, 13,021 tiles in DiffBulk (7 sections). Tiles sum the nuclei of the anucleus "
        "table (raw counts layer) by their HE_nuc_original centroid on HE_original. Patient = name up to "
        "'_' (UC1_I and UC1_NI are one patient).",
        spot_diameter_um=112.0,
        pseudobulk={**_DIFFBULK_TILES, "aggregate": "cells"},
    )
)

register_dataset(
    DatasetCard(
        name="tupro",
        title="10x Tumor Profiler (TuPro) melanoma Visium (STMDiT)",
        reader="visium",
        platform="visium",
        tissue="skin (melanoma metastases)",
        n_slides=None,
        n_patients=None,
        source_url="https://doi.org/10.1016/j.ccell.2021.05.014",
        how_to_get="Obtain through the Tumor Profiler consortium data access process; lay out as Space "
        "Ranger outs per slide; stbench data prepare tupro --source DIR",
        access="controlled",
        licence="consortium agreement",
        citation="Irmisch A. et al. The Tumor Profiler Study. Cancer Cell 39, 288-293 (2021).",
        default_protocol="stmdit",
        spot_diameter_um=55.0,
    )
)

register_dataset(
    DatasetCard(
        name="tcga-skcm",
        title="TCGA-SKCM H&E only, tiled (STMDiT out-of-distribution evaluation)",
        reader="he-tiles",
        platform="other",
        tissue="skin (melanoma)",
        n_slides=None,
        n_patients=None,
        source_url="https://portal.gdc.cancer.gov/projects/TCGA-SKCM",
        how_to_get="Download the diagnostic H&E slides (SVS) from the GDC portal (gdc-client); write "
        "slides.csv with columns slide, image, mpp (the SVS header's MPP), patient (the 12-character "
        "TCGA barcode) and optionally pseudolabels (a pseudo-label .h5ad of the slide's tiles); "
        "--source DIR. Tiles of 55 um passing STMDiT's spot filters become spots; no expression is "
        "measured (docs/stmdit-data.md)",
        access="public (GDC open tier)",
        licence="NIH GDC data use",
        citation="Cancer Genome Atlas Network. Genomic classification of cutaneous melanoma. Cell 161 (2015).",
        default_protocol="stmdit",
    )
)

for _task in ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "ccRCC", "HCC", "LUNG", "LYMPH_IDC"):
    register_dataset(
        DatasetCard(
            name=f"hest-bench-{_task.lower()}",
            title=f"HEST-Bench task {_task}",
            reader="hest",
            platform="visium",
            tissue=_task,
            n_slides=None,
            n_patients=None,
            source_url="https://huggingface.co/datasets/MahmoodLab/hest-bench",
            how_to_get=_HEST_HOWTO.format(name=f"hest-bench-{_task.lower()}")
            + f" (HEST-Bench folder bench_data/{_task}: splits/*.csv, var_50genes.json)",
            access="gated (Hugging Face terms)",
            licence="CC BY-NC-SA 4.0",
            citation="Jaume G. et al. HEST-1k (NeurIPS 2024), HEST-Bench.",
            default_protocol="hest",
            notes="Official patient-level split CSVs and 50-gene list ship with the task.",
        )
    )

register_dataset(
    DatasetCard(
        name="synthetic",
        title="Procedural H&E-like slides with image-dependent genes (offline default)",
        reader="synthetic",
        platform="synthetic",
        tissue="procedural",
        n_slides=4,
        n_patients=2,
        source_url="generated by stbench (stbench.data.synthetic)",
        how_to_get="stbench data prepare synthetic (generated locally, seeded; no download)",
        access="offline",
        licence="MIT (generated)",
        citation="stbench",
        default_protocol="loso",
        spot_diameter_um=55.0,
        notes="Each gene is a known function of local morphology plus count noise; see docs/datasets.md.",
    )
)

register_dataset(
    DatasetCard(
        name="synthetic-context",
        title="Synthetic slides where part of each spot's expression depends on tissue outside its patch",
        reader="synthetic",
        platform="synthetic",
        tissue="procedural",
        n_slides=4,
        n_patients=2,
        source_url="generated by stbench (stbench.data.synthetic, variant context)",
        how_to_get="stbench data prepare synthetic-context (generated locally, seeded; no download)",
        access="offline",
        licence="MIT (generated)",
        citation="stbench",
        default_protocol="loso",
        spot_diameter_um=55.0,
        reader_options={"generate": {"variant": "context"}},
        notes="The synthetic slides plus 'neighbour' genes (what the 8 surrounding spots show beyond "
        "the spot itself) and 'region' genes (the side of a random boundary across the slide); "
        "the dataset of the full-vs-ablation method tests (tests/test_context_ablations.py). The gene "
        "model is documented in stbench/data/synthetic.py.",
    )
)
