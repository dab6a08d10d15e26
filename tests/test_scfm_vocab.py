"""GeneVocab (baselines/_scfm/vocab.py): CellFM gene_info.csv-style files, JSON, mapping and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from baselines._scfm import build_backbone
from baselines._scfm.vocab import UNMAPPED, GeneVocab
from stbench.errors import DataError

GENE_INFO = (
    "HGNC_gene,h5_sample_frequency,biotype,gene_length,feature\n"
    "A1BG,17850,gene with protein product,8315.0,protein coding\n"
    'AATBC,10922,"RNA, long non-coding",6810.0,lncRNA\n'
    "KRT6A,9000,gene with protein product,100.0,protein coding\n"
    "GNAS,19000,gene with protein product,200.0,protein coding\n"
    "FXYD2,5000,gene with protein product,300.0,protein coding\n"
    "C1orf112,100,gene with protein product,1.0,protein coding\n"
)


@pytest.fixture
def gene_info(tmp_path: Path) -> Path:
    path = tmp_path / "gene_info.csv"
    path.write_text(GENE_INFO)
    return path


def test_gene_info_csv_ids_are_row_order_plus_one(gene_info: Path) -> None:
    v = GeneVocab.from_file(gene_info)
    assert len(v) == 6 and v.pad_id == 0 and v.max_id == 6
    assert v.ids["A1BG"] == 1 and v.ids["AATBC"] == 2 and v.ids["C1orf112"] == 6  # quoted comma kept
    assert v.symbols == ["A1BG", "AATBC", "KRT6A", "GNAS", "FXYD2", "C1orf112"]


def test_map_exact_case_insensitive_and_unmapped(gene_info: Path) -> None:
    v = GeneVocab.from_file(gene_info)
    symbols = ["GNAS", "krt6a", "C1ORF112", "NOTAGENE", " FXYD2 ", "MT-CO1"]
    ids, unmapped = v.map(symbols)
    assert ids.dtype == np.int64
    assert ids.tolist() == [4, 3, 6, UNMAPPED, 5, UNMAPPED]
    assert unmapped == ["NOTAGENE", "MT-CO1"]
    m = v.match(symbols)
    assert m.exact == 2 and m.case_insensitive == [("krt6a", "KRT6A"), ("C1ORF112", "C1orf112")]
    assert m.mapped_mask.tolist() == [True, True, True, False, True, False]
    assert v.report(symbols) == "4/6 genes mapped (2 exact, 2 case-insensitive); 2 unmapped: NOTAGENE, MT-CO1"
    assert m.to_dict()["unmapped"] == ["NOTAGENE", "MT-CO1"] and m.to_dict()["n_mapped"] == 4


def test_ambiguous_case_fold_does_not_guess() -> None:
    v = GeneVocab.from_symbols(["Abc", "ABC", "XYZ"])
    ids, unmapped = v.map(["ABC", "abc", "xyz"])
    assert ids.tolist() == [2, UNMAPPED, 3] and unmapped == ["abc"]


def test_explicit_columns_tsv_and_json(tmp_path: Path) -> None:
    tsv = tmp_path / "vocab.tsv"
    tsv.write_text("ensembl\tsymbol\tidx\nENSG1\tTP53\t10\nENSG2\tEGFR\t11\n")
    v = GeneVocab.from_file(tsv, id_column="idx")
    assert v.ids == {"TP53": 10, "EGFR": 11}
    v2 = GeneVocab.from_file(tsv, symbol_column="ensembl")
    assert v2.ids == {"ENSG1": 1, "ENSG2": 2}
    js = tmp_path / "vocab.json"
    js.write_text(json.dumps({"<pad>": 0, "TP53": 5, "EGFR": 6}))
    v3 = GeneVocab.from_file(js, pad_id=99)
    assert v3.map(["TP53", "<pad>"])[0].tolist() == [5, 0]
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(["TP53", "EGFR"]))
    assert GeneVocab.from_file(lst).ids == {"TP53": 1, "EGFR": 2}


def test_bad_vocabularies_name_file_and_field(tmp_path: Path) -> None:
    dup = tmp_path / "dup.csv"
    dup.write_text("HGNC_gene\nTP53\nEGFR\nTP53\n")
    with pytest.raises(DataError, match="duplicate gene symbol 'TP53'") as e:
        GeneVocab.from_file(dup)
    assert e.value.field == "TP53" and e.value.file == str(dup)
    with pytest.raises(DataError, match="no column 'gene_id'") as e:
        GeneVocab.from_file(dup, id_column="gene_id")
    assert e.value.field == "gene_id"
    empty = tmp_path / "empty.csv"
    empty.write_text('HGNC_gene\nTP53\n""\n')
    with pytest.raises(DataError, match="empty gene symbol at row 2"):
        GeneVocab.from_file(empty)
    js = tmp_path / "pad.json"
    js.write_text(json.dumps({"TP53": 0}))
    with pytest.raises(DataError, match="padding id 0"):
        GeneVocab.from_file(js)
    with pytest.raises(DataError, match="not found"):
        GeneVocab.from_file(tmp_path / "absent.csv")


def test_backbone_carries_its_vocab(gene_info: Path) -> None:
    m = build_backbone("cellfm", "tiny", vocab=gene_info)
    assert isinstance(m.vocab, GeneVocab) and len(m.vocab) == 6
    ids, unmapped = m.vocab.map(["KRT6A", "GNAS", "FXYD2"])
    assert not unmapped and m.gene_emb.shape[0] == 8  # random init: table sized to the vocabulary
    assert build_backbone("cellfm", "tiny").gene_emb.shape[0] == 104
