"""Bad input: each case gives a clear error naming the file (and layer where there is one),
and the user's model stays unpatched."""
from __future__ import annotations

import pickle

import pytest
import torch

from support import lora_factory
from support import tiny_models
from test_fuse_exact import _sample

FAMILY = "sd15"


@pytest.fixture
def model(comfy):
    return tiny_models.build_model(FAMILY, seed=0)


@pytest.fixture
def good_style(klora_pack, model, tmp_path):
    from klora_pack.nodes.handles import make_handle

    sd, _ = lora_factory.make_lora(model, "kohya", rank=2, seed=8)
    lora_factory.save_lora(sd, tmp_path / "style.safetensors")
    return make_handle("style", "style.safetensors", str(tmp_path / "style.safetensors"), 1.0)


def _subject_from(klora_pack, tmp_path, state_dict, name="subject.safetensors"):
    from klora_pack.nodes.handles import make_handle

    lora_factory.save_lora(state_dict, tmp_path / name)
    return make_handle("subject", name, str(tmp_path / name), 1.0)


def _assert_unpatched(model, before):
    assert model.patches == {}
    assert all(not v for v in model.wrappers.values())
    assert torch.equal(_sample(model, FAMILY, 4), before)


def _fuse_error(klora_pack, model, subject, style, **kwargs):
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.fuse import fuse_model

    with pytest.raises(KLoRAError) as info:
        fuse_model(model, subject, style, **kwargs)
    return str(info.value)


def test_missing_file_in_loader(klora_pack, tmp_path):
    import folder_paths
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.lora_loaders import KLoRASubjectLoader

    folder_paths.add_model_folder_path("loras", str(tmp_path))
    with pytest.raises(KLoRAError, match="not_there.safetensors"):
        KLoRASubjectLoader.execute("not_there.safetensors", 1.0)


def test_missing_path(klora_pack, tmp_path):
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.handles import make_handle

    with pytest.raises(KLoRAError, match="file not found"):
        make_handle("subject", "gone.safetensors", str(tmp_path / "gone.safetensors"), 1.0)


def test_truncated_safetensors(klora_pack, model, tmp_path):
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.handles import make_handle

    sd, _ = lora_factory.make_lora(model, "kohya", rank=2, seed=1)
    path = tmp_path / "cut.safetensors"
    lora_factory.save_lora(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KLoRAError, match="cut.safetensors.*(truncated|corrupt)"):
        make_handle("subject", "cut.safetensors", str(path), 1.0)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(KLoRAError, match="cut.safetensors"):
        make_handle("subject", "cut.safetensors", str(path), 1.0)


class _Payload:
    """Unpickling this would create a file (it must never happen)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_pickle_payload_is_never_executed(klora_pack, tmp_path, suffix):
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.handles import make_handle

    marker = tmp_path / "pwned.txt"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": _Payload(str(marker))}, f)
    with pytest.raises(KLoRAError, match=f"evil{suffix}.*safely"):
        make_handle("subject", path.name, str(path), 1.0)
    assert not marker.exists()


def test_pickle_with_plain_tensors_loads_safely(klora_pack, model, tmp_path):
    from klora_pack.nodes.handles import make_handle

    sd, _ = lora_factory.make_lora(model, "kohya", rank=2, seed=1)
    torch.save(sd, tmp_path / "ok.pt")
    handle = make_handle("subject", "ok.pt", str(tmp_path / "ok.pt"), 1.0)
    assert set(handle.state_dict) == set(sd)


def test_lora_for_another_family(klora_pack, model, tmp_path, good_style):
    sdxl = tiny_models.build_model("sdxl", seed=0)
    sd, _ = lora_factory.make_lora(sdxl, "kohya", rank=2, seed=1, scope="all")
    subject = _subject_from(klora_pack, tmp_path, sd, "sdxl_lora.safetensors")
    before = _sample(model, FAMILY, 4)
    message = _fuse_error(klora_pack, model, subject, good_style)
    assert "sdxl_lora.safetensors" in message
    assert "SD15" in message or "another model" in message
    _assert_unpatched(model, before)


def test_zero_matched_keys(klora_pack, model, tmp_path, good_style):
    sd = {"some.random.name.lora_down.weight": torch.randn(2, 8), "some.random.name.lora_up.weight": torch.randn(8, 2)}
    subject = _subject_from(klora_pack, tmp_path, sd, "nomatch.safetensors")
    message = _fuse_error(klora_pack, model, subject, good_style)
    assert "nomatch.safetensors" in message and "matched none" in message and "SD15" in message


def test_all_zero_lora(klora_pack, model, tmp_path, good_style):
    sd, _ = lora_factory.make_lora(model, "kohya", rank=4, seed=1)
    sd = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in sd.items()}
    subject = _subject_from(klora_pack, tmp_path, sd, "zeros.safetensors")
    before = _sample(model, FAMILY, 4)
    message = _fuse_error(klora_pack, model, subject, good_style)
    assert "zeros.safetensors" in message and "zero" in message and "gamma" in message
    _assert_unpatched(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(klora_pack, model, tmp_path, bad):
    from klora_pack.klora_core.errors import KLoRAError

    sd, _ = lora_factory.make_lora(model, "kohya", rank=2, seed=1)
    key = sorted(k for k in sd if k.endswith("lora_up.weight"))[3]
    sd[key][0, 0] = bad
    with pytest.raises(KLoRAError, match=f"bad.safetensors.*{key.replace('.', '[.]')}.*NaN or infinite"):
        _subject_from(klora_pack, tmp_path, sd, "bad.safetensors")


def test_rank_mismatch_between_up_and_down(klora_pack, model, tmp_path, good_style):
    sd, _ = lora_factory.make_lora(model, "kohya", rank=4, seed=1)
    key = sorted(k for k in sd if k.endswith("lora_down.weight"))[0]
    sd[key] = sd[key][:3].clone()
    subject = _subject_from(klora_pack, tmp_path, sd, "ranks.safetensors")
    before = _sample(model, FAMILY, 4)
    message = _fuse_error(klora_pack, model, subject, good_style)
    layer = key[len("lora_unet_"):].split(".")[0]
    assert "ranks.safetensors" in message and "rank" in message
    assert layer.split("_")[-1] in message
    _assert_unpatched(model, before)


def test_style_in_subject_socket_is_refused(klora_pack, model, good_style):
    message = _fuse_error(klora_pack, model, good_style, good_style)
    assert "Load Subject LoRA" in message


def test_zero_strength_applies_the_other_lora_alone(klora_pack, model, tmp_path, good_style):
    import comfy.sd
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle

    sd, _ = lora_factory.make_lora(model, "kohya", rank=4, seed=1)
    lora_factory.save_lora(sd, tmp_path / "s.safetensors")
    subject = make_handle("subject", "s.safetensors", str(tmp_path / "s.safetensors"), 0.0)
    result = fuse_model(model, subject, good_style)
    assert "strength is 0" in result.report
    plain = comfy.sd.load_lora_for_models(model, None, good_style.state_dict, 1.0, 0.0)[0]
    assert torch.equal(_sample(result.model, FAMILY, 4), _sample(plain, FAMILY, 4))
