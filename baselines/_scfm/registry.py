"""build_backbone(kind, size, checkpoint, vocab): one entry per backbone kind in BUILDERS.

A builder is `fn(size: str, checkpoint: str | None, vocab: GeneVocab | str | None, **options) -> Backbone`.
The scGPT helper adds `BUILDERS["scgpt"]` (baselines/_scfm/scgpt.py) with register_backbone("scgpt", fn).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from baselines._scfm.base import Backbone

Builder = Callable[..., Backbone]
BUILDERS: dict[str, Builder] = {}


def register_backbone(kind: str, builder: Builder) -> Builder:
    BUILDERS[kind] = builder
    return builder


def _load_vocab(vocab: Any) -> Any:
    if vocab is None or not isinstance(vocab, str | Path):
        return vocab
    from baselines._scfm.vocab import GeneVocab

    return GeneVocab.from_file(vocab)


def _build_cellfm(
    size: str, checkpoint: str | Path | None = None, vocab: Any = None, **overrides: Any
) -> Backbone:
    """Random init (weights_id 'none') or a MindSpore .ckpt sized from the file (gene rows, layers)."""
    vocab = _load_vocab(vocab)
    if checkpoint is None:
        from baselines._scfm.cellfm import build_cellfm

        if vocab is not None and "n_genes" not in overrides and "gene_rows" not in overrides:
            overrides["n_genes"] = vocab.max_id  # random init: the table fits the vocabulary
        model = build_cellfm(size, **overrides)
        model.vocab = vocab
        return model
    from baselines._scfm.ckpt import load_cellfm

    return load_cellfm(checkpoint, size=size, vocab=vocab, **overrides)


register_backbone("cellfm", _build_cellfm)


def _ensure_scgpt() -> None:
    """scgpt.py registers itself on import; import it lazily so a missing file only hurts scGPT users."""
    if "scgpt" not in BUILDERS:
        try:
            import baselines._scfm.scgpt  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name != "baselines._scfm.scgpt":
                raise


def build_backbone(
    kind: str, size: str, checkpoint: str | Path | None = None, vocab: Any = None, **options: Any
) -> Backbone:
    """The backbone `kind` ("cellfm" | "scgpt") of `size`, from `checkpoint` if given, with `vocab`."""
    if kind == "scgpt":
        _ensure_scgpt()
    if kind not in BUILDERS:
        from stbench.errors import UnknownNameError

        raise UnknownNameError("backbone", kind, sorted({*BUILDERS, "scgpt"}))
    return BUILDERS[kind](size, checkpoint=checkpoint, vocab=vocab, **options)
