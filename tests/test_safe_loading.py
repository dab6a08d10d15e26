"""No user-supplied weight file can run code: each loader gets a pickle whose __reduce__ creates a file.

Why: checkpoints, encoder weights and stage I files are shared between users (suites document
sharing them); a loader that unpickles arbitrary objects runs whatever the file says. Each loader
must refuse the file with a clear stbench error and the marker file must never appear.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from stbench.errors import StbenchError


class _Payload:
    """Unpickling this calls os.system('touch MARKER'): what a crafted weight file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path) -> Path:
    """A torch.save file shaped like a checkpoint whose one value runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "stbench-diffbulk-stage1/1", "state_dict": {"w": _Payload(marker)}}, path)
    return path


def test_the_crafted_file_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Control: without weights_only the file executes its command (so the tests below can fail)."""
    marker = tmp_path / "control-marker"
    path = _crafted(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _stage1(path: Path) -> None:
    from baselines.diffbulk.stage1 import load_stage1

    load_stage1(path)


def _runner_checkpoint(path: Path) -> None:
    from stbench.benchmark.runner import _load_weights

    _load_weights(torch.nn.Linear(2, 2), str(path))  # type: ignore[arg-type]


def _encoder_weights(path: Path) -> None:
    from stbench.encoders.weights import load_state_dict

    load_state_dict(path)


def _scgpt(path: Path) -> None:
    from baselines._scfm.scgpt_ckpt import read_state

    read_state(path)


def _cellfm(path: Path) -> None:
    from baselines._scfm.ckpt import read_ckpt

    read_ckpt(path)


def _cancerfoundation(path: Path) -> None:
    from baselines.stmdit.ge_encoder import load_cancerfoundation

    folder = path.parent
    (folder / "vocab.json").write_text(json.dumps({"<pad>": 0, "<cls>": 1, "A": 2, "B": 3}))
    (folder / "args.json").write_text(json.dumps({"embsize": 8, "nlayers": 1, "nheads": 2, "d_hid": 8}))
    load_cancerfoundation(folder)


LOADERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "diffbulk-stage1": ("stage1.pt", _stage1),
    "runner-checkpoint": ("last.ckpt", _runner_checkpoint),
    "encoder-weights": ("pytorch_model.bin", _encoder_weights),
    "scgpt": ("best_model.pt", _scgpt),
    "cellfm": ("CellFM_80M_weight.ckpt", _cellfm),
    "cancerfoundation": ("model.pth", _cancerfoundation),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_loader_refuses_a_code_executing_pickle(tmp_path: Path, loader: str) -> None:
    name, load = LOADERS[loader]
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / loader / name, marker)
    with pytest.raises(StbenchError) as info:
        load(path)
    message = str(info.value)
    print(f"{loader}: {message}")
    assert not marker.exists(), f"{loader} executed code from {path}"
    # a stbench error that names the file (torch's explanation may follow on further lines)
    assert str(path) in message or path.name in message or str(path.parent) in message


def test_stage1_round_trip_is_safetensors_and_old_files_still_load(tmp_path: Path) -> None:
    """New stage I files are safetensors (JSON metadata in the header); an old plain torch.save
    file of tensors is still read through weights_only=True."""
    from safetensors import safe_open

    from baselines.diffbulk.edm2.precond import Precond
    from baselines.diffbulk.gene_encoder import GeneVocabulary
    from baselines.diffbulk.method import unet_config
    from baselines.diffbulk.stage1 import LEGACY_FORMAT, load_stage1, save_stage1

    cfg = unet_config("tiny")
    net = Precond(**cfg)
    new = tmp_path / "s1.safetensors"
    save_stage1(new, net, cfg, GeneVocabulary(["A", "B"]), {"steps": 3})
    with safe_open(str(new), framework="pt") as f:
        meta = json.loads(f.metadata()["stbench"])
    assert meta["format"] == "stbench-diffbulk-stage1/2" and meta["vocab"] == ["A", "B"]
    loaded, unet, info = load_stage1(new)
    assert unet_config(unet) == cfg and info == {"steps": 3}
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    old = tmp_path / "stage1.pt"
    payload = {"format": LEGACY_FORMAT, "unet": cfg, "vocab": ["A", "B"], "info": {"steps": 1}}
    torch.save({**payload, "state_dict": net.state_dict()}, old)
    loaded_old, _, info_old = load_stage1(old)
    assert info_old == {"steps": 1}
    for key, value in net.state_dict().items():
        assert torch.equal(loaded_old.state_dict()[key], value), key
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary behind
