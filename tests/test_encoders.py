"""Every encoder loads a tiny checkpoint saved in its source's exact on-disk format, through the real
loading path with HF_HUB_OFFLINE=1; wrong checkpoints and absent gated models fail fast and clearly.

Tiny variants: `build_encoder(name, "none", arch_overrides=spec.tiny)` uses the same constructor as the
full model with only the size knobs (depth, width, heads, image size) taken from `spec.tiny`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stbench.encoders import ENCODERS, WeightsError, build_encoder, check_encoder, get_spec, list_encoders
from stbench.errors import UnknownNameError

REV = "0123456789abcdef0123456789abcdef01234567"
TIMM = [n for n, s in ENCODERS.items() if s.family in ("timm-vit", "timm-resnet-trunc")]
HF = [n for n, s in ENCODERS.items() if s.family == "hf-transformers"]
TV = [n for n, s in ENCODERS.items() if s.family == "torchvision"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def snapshot(cache: Path, repo_id: str) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def tiny(name: str, seed: int = 0):
    """A tiny encoder whose weights depend on `seed`. build_encoder seeds its random init (one
    reproducible "none" model), so the parameters are perturbed here: a saved tiny checkpoint then
    differs both from another seed and from a plain random init that a broken loader might fall to."""
    enc = build_encoder(name, "none", arch_overrides=get_spec(name).tiny)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return enc


def images(px: int = 40) -> torch.Tensor:
    return torch.rand(2, 3, px, px, generator=torch.Generator().manual_seed(1))


def json_args(spec) -> dict:
    return {k: v for k, v in spec.tiny.items() if k != "input_px"}


def save_timm_hub(cache: Path, name: str, fmt: str = "safetensors") -> torch.nn.Module:
    spec = get_spec(name)
    enc = tiny(name)
    model = enc.net.model
    snap = snapshot(cache, spec.hub_id)
    config = {
        "architecture": spec.arch,
        "model_args": json_args(spec),
        "pretrained_cfg": {"mean": spec.mean, "std": spec.std, "input_size": [3, spec.input_px] * 1},
    }
    if spec.family == "timm-resnet-trunc":
        config["num_classes"] = model.num_classes
    (snap / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(snap / "model.safetensors"))
    else:
        torch.save(state, snap / "pytorch_model.bin")
    return enc


def save_hf_hub(cache: Path, name: str):
    spec = get_spec(name)
    enc = tiny(name)
    enc.net.model.save_pretrained(str(snapshot(cache, spec.hub_id)))
    return enc


def conch_state(enc) -> dict:
    state = {f"visual.{k}": v for k, v in enc.net.state_dict().items()}
    state["text.token_embedding.weight"] = torch.zeros(10, 4)  # the text tower is dropped by prefix
    state["logit_scale"] = torch.tensor(1.0)
    return state


def save_conch_hub(cache: Path):
    enc = tiny("conch")
    torch.save(conch_state(enc), snapshot(cache, "MahmoodLab/conch") / "pytorch_model.bin")
    return enc


def _old_densenet_key(k: str) -> str:
    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k)


def tv_state(name: str, enc) -> dict:
    state = dict(enc.net.net.state_dict())
    if name == "densenet121":  # torchvision's published file uses the old "norm.1" naming
        state = {_old_densenet_key(k): v for k, v in state.items()}
    if name == "vgg16":
        state = {f"features.{k}": v for k, v in state.items()}
        state["classifier.0.weight"] = torch.zeros(4, 4)
    return state


def save_torchvision(tmp_path: Path, name: str):
    from torchvision.models import get_weight

    enc = tiny(name)
    url = get_weight(get_spec(name).hub_id).url
    target = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / os.path.basename(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tv_state(name, enc), target)
    return enc


def assert_same(enc_saved, enc_loaded) -> None:
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(enc_loaded(x), enc_saved(x), rtol=1e-5, atol=1e-5)
        other = tiny(enc_saved.spec.name, seed=123)(x)
    assert not torch.allclose(other, enc_saved(x)), "random init matched: test would not detect a non-load"


def test_registry_lists_every_encoder_with_facts():
    names = {s.name for s in list_encoders()}
    want = {
        "uni",
        "uni2-h",
        "conch",
        "plip",
        "gigapath",
        "h-optimus-0",
        "h0-mini",
        "virchow2",
        "midnight",
        "phikon",
        "phikon-v2",
        "resnet50-trunc",
        "densenet121",
        "vgg16",
        "resnet18",
        "resnet50",
    }
    assert want <= names
    dims = {
        "uni": 1024,
        "uni2-h": 1536,
        "conch": 512,
        "plip": 512,
        "virchow2": 2560,
        "midnight": 3072,
        "resnet50-trunc": 1024,
        "resnet18": 512,
        "resnet50": 2048,
        "densenet121": 1024,
    }
    assert all(get_spec(n).dim == d for n, d in dims.items())
    assert get_spec("uni").gated and not get_spec("plip").gated
    with pytest.raises(UnknownNameError, match="'uni'"):
        get_spec("unii")


@pytest.mark.parametrize("name", TIMM)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_timm_hub_tiny_checkpoint_loads(hub, name, fmt):
    saved = save_timm_hub(hub, name, fmt)
    loaded = build_encoder(name, "default", arch_overrides=get_spec(name).tiny)
    assert loaded.weights_id == f"hf:{get_spec(name).hub_id}@{REV[:12]}"
    assert loaded(images()).shape == (2, saved.dim)
    assert_same(saved, loaded)


@pytest.mark.parametrize("name", HF)
def test_hf_transformers_tiny_checkpoint_loads(hub, name):
    saved = save_hf_hub(hub, name)
    loaded = build_encoder(name, "default", arch_overrides=get_spec(name).tiny)
    assert loaded.weights_id == f"hf:{get_spec(name).hub_id}@{REV[:12]}"
    assert_same(saved, loaded)


def test_phikon_checkpoint_with_unused_pooler_loads(hub):
    """Phikon's card drops the pooler (add_pooling_layer=False); pooler weights in the file are ignored."""
    saved = save_hf_hub(hub, "phikon")
    snap = snapshot(hub, "owkin/phikon")
    from safetensors.torch import load_file

    state = load_file(str(snap / "model.safetensors"))
    state["pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(state, str(snap / "model.safetensors"))
    assert_same(saved, build_encoder("phikon", "default", arch_overrides=get_spec("phikon").tiny))


def test_conch_tiny_checkpoint_loads_vision_tower_only(hub):
    saved = save_conch_hub(hub)
    loaded = build_encoder("conch", "default", arch_overrides=get_spec("conch").tiny)
    assert loaded.weights_id == f"hf:MahmoodLab/conch@{REV[:12]}"
    assert loaded(images()).shape == (2, get_spec("conch").tiny["embed_dim"])
    assert_same(saved, loaded)


@pytest.mark.parametrize("name", TV)
def test_torchvision_tiny_checkpoint_loads(hub, tmp_path, name):
    saved = save_torchvision(tmp_path, name)
    loaded = build_encoder(name, "default", arch_overrides=get_spec(name).tiny)
    assert loaded.weights_id == f"torchvision:{get_spec(name).hub_id}"
    assert_same(saved, loaded)


def test_full_size_dims_follow_the_card():
    """Full architectures (random init) produce the documented dims (cheap ones only on CPU)."""
    for name in ("resnet18", "resnet50-trunc"):
        enc = build_encoder(name, "none")
        assert enc.weights_id == "none"
        assert enc(torch.rand(1, 3, 64, 64)).shape == (1, get_spec(name).dim)


def _corrupt(state: dict) -> tuple[dict, str, str]:
    keys = sorted(k for k, v in state.items() if v.ndim >= 1)
    missing, reshaped = keys[0], keys[-1]
    bad = {k: v.clone() for k, v in state.items() if k != missing}
    bad[reshaped] = torch.zeros(*[s + 1 for s in state[reshaped].shape])
    return bad, missing, reshaped


def _local_checkpoint(tmp_path: Path, name: str) -> tuple[Path, str, str]:
    spec = get_spec(name)
    enc = tiny(name)
    if spec.family == "hf-transformers":
        d = tmp_path / "hfdir"
        enc.net.model.save_pretrained(str(d))
        from safetensors.torch import load_file

        bad, missing, reshaped = _corrupt(load_file(str(d / "model.safetensors")))
        save_file({k: v.contiguous() for k, v in bad.items()}, str(d / "model.safetensors"))
        return d, missing, reshaped
    if spec.family == "conch":
        bad, missing, reshaped = _corrupt(
            {k: v for k, v in conch_state(enc).items() if k.startswith("visual.")}
        )
        path = tmp_path / "conch.bin"
        torch.save(bad, path)
        return path, missing.removeprefix("visual."), reshaped.removeprefix("visual.")
    if spec.family == "torchvision":
        bad, missing, reshaped = _corrupt(tv_state(name, enc))
        path = tmp_path / "sd.pth"
        torch.save(bad, path)
        strip = "features." if name == "vgg16" else ""
        return path, missing.removeprefix(strip), reshaped.removeprefix(strip)
    bad, missing, reshaped = _corrupt(enc.net.model.state_dict())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in bad.items()}, str(path))
    return path, missing, reshaped


@pytest.mark.parametrize("name", list(ENCODERS))
def test_wrong_checkpoint_names_the_keys(hub, tmp_path, name):
    path, missing, reshaped = _local_checkpoint(tmp_path, name)
    with pytest.raises(WeightsError) as err:
        build_encoder(name, str(path), arch_overrides=get_spec(name).tiny)
    msg = str(err.value)
    if name == "densenet121":
        missing = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", missing)
    assert missing in msg or reshaped in msg, msg
    assert "missing" in msg or "shape" in msg or "size" in msg


def test_local_file_weights_id_is_content_hash(tmp_path):
    enc = tiny("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(tv_state("resnet18", enc), path)
    loaded = build_encoder("resnet18", str(path), arch_overrides=get_spec("resnet18").tiny)
    assert re.fullmatch(r"file:[0-9a-f]{12}", loaded.weights_id)
    assert_same(enc, loaded)


@pytest.mark.parametrize("name", ["uni", "conch", "h0-mini", "plip"])
def test_absent_hub_model_fails_fast_with_access_hint(hub, name):
    spec = get_spec(name)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        build_encoder(name)
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert spec.hub_id in msg and f"https://huggingface.co/{spec.hub_id}" in msg
    assert "--weights PATH" in msg and "offline mode is on" in msg
    if spec.gated:
        assert "huggingface-cli login" in msg and "request access" in msg
    assert "\n" not in msg  # one line, no chained traceback wall


def test_unreachable_hub_fails_fast(hub, monkeypatch):
    """Not offline, but no network: a bounded probe avoids huggingface_hub's ~20 s retry loop per file."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"MahmoodLab/UNI2-h.*unreachable.*request access"):
        build_encoder("uni2-h")
    assert time.perf_counter() - t0 < 5


def test_torchvision_offline_without_copy_fails_fast(hub):
    with pytest.raises(WeightsError, match="ResNet18_Weights.IMAGENET1K_V1.*offline"):
        build_encoder("resnet18")


def test_check_encoder_reports_dims_and_weights_id(hub, tmp_path):
    save_torchvision(tmp_path, "resnet18")
    # full-size check needs full-size weights: use random init, which is labelled "none"
    report = check_encoder("resnet18", "none")
    assert report["dim"] == 512 == report["expected_dim"] and report["weights_id"] == "none"
    assert report["finite"] and report["seconds"] >= 0


def test_cli_lists_and_checks_encoders(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from stbench.cli import main

    assert main(["list", "encoders"]) == 0
    out = capsys.readouterr().out
    for name in ("uni", "uni2-h", "conch", "plip", "gigapath", "h-optimus-0", "virchow2", "resnet50-trunc"):
        assert name in out
    assert main(["encoders", "check", "resnet18", "--weights", "none"]) == 0
    assert "512" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # no copy of UNI anywhere
    assert main(["encoders", "check", "uni"]) == 2
    err = capsys.readouterr().err
    assert "MahmoodLab/UNI" in err and "request access" in err and "--weights PATH" in err
