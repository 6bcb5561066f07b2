"""LoRA files that cannot be used as they are must say so: which file, what is wrong, what to do.

Issue 8, item 15.  The files are real exports (``export_lora``) of a LoRA on the
tiny UNet's attention layers, then rewritten with keys removed or tensors
reshaped, as a damaged download or a LoRA for another model would be.
"""
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kolors_course.lora.files as lora_files
import kolors_course.models.loading as models

RANK, ALPHA = 4, 8.0          # trained scale alpha / rank = 2


@pytest.fixture(scope="module")
def mm(tiny):
    return models.load_model_manager(tiny)


def _unet(mm):
    return mm.model[mm.model_name.index("sdxl_unet")]


def _config(mm):
    return Path(mm.model_path[mm.model_name.index("sdxl_unet")]).with_name("config.json")


@pytest.fixture(scope="module")
def exported(mm, tmp_path_factory):
    """{"diffsynth": path, "kohya": path} for a rank-4, alpha-8 LoRA on to_q/to_k of the tiny UNet."""
    params = dict(_unet(mm).named_parameters())
    gen = torch.Generator().manual_seed(0)
    pairs = {}
    for module in sorted(lora_files.diffusers_module_map(_config(mm))):
        if module.split(".")[-1] in ("to_q", "to_k") and params[f"{module}.weight"].ndim == 2:
            out_f, in_f = params[f"{module}.weight"].shape
            pairs[module] = (torch.randn(RANK, in_f, generator=gen) * 0.1,
                             torch.randn(out_f, RANK, generator=gen) * 0.1)
    assert len(pairs) >= 2
    out = tmp_path_factory.mktemp("lora_files")
    return lora_files.export_lora(pairs, RANK, ALPHA, out, "good", _config(mm))


def _rewrite(src, dst, edit=None, metadata=True):
    """Copy a safetensors file through ``edit(state)``; ``metadata=False`` drops its metadata."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if edit is not None:
        edit(state)
    save_file(state, str(dst), metadata=meta if metadata else None)
    return dst


def _first(state, suffix):
    return sorted(k for k in state if k.endswith(suffix))[0]


def _unet_weights(mm):
    return {k: v.detach().clone() for k, v in _unet(mm).state_dict().items()}


def _unchanged(mm, before):
    after = _unet(mm).state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


# --- a missing alpha: warned like a peft file without metadata ---------------------------
NO_ALPHA = r"does not say its alpha; assuming alpha = rank \(scale 1.0\)"


def test_kohya_file_without_alpha_warns_like_peft(exported, mm, tmp_path):
    def drop_alpha(state):
        for k in [k for k in state if k.endswith(".alpha")]:
            del state[k]

    kohya = _rewrite(exported["kohya"], tmp_path / "no_alpha_kohya.safetensors", drop_alpha, metadata=False)
    peft = _rewrite(exported["diffsynth"], tmp_path / "no_alpha_peft.safetensors", metadata=False)
    messages = {}
    for path, config in ((kohya, _config(mm)), (peft, None)):
        with pytest.warns(UserWarning, match=NO_ALPHA) as caught:
            modules, _ = lora_files.read_lora(path, config)
        assert {s for _, _, s in modules.values()} == {1.0}
        text = [str(w.message) for w in caught if "alpha" in str(w.message)]
        assert len(text) == 1 and path.name in text[0]
        messages[path] = text[0].replace(path.name, "<file>")
    assert messages[kohya] == messages[peft]          # the same warning for both layouts


def test_kohya_file_without_alpha_keys_uses_the_metadata(exported, mm, tmp_path):
    """A kit file that lost its .alpha keys still says lora_alpha in its metadata: use it, silently."""
    def drop_alpha(state):
        for k in [k for k in state if k.endswith(".alpha")]:
            del state[k]

    path = _rewrite(exported["kohya"], tmp_path / "meta_alpha_kohya.safetensors", drop_alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modules, _ = lora_files.read_lora(path, _config(mm))
    assert {s for _, _, s in modules.values()} == {ALPHA / RANK}


def test_complete_files_read_without_warning(exported, mm):
    for layout in ("kohya", "diffsynth"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            modules, _ = lora_files.read_lora(exported[layout], _config(mm))
        assert {s for _, _, s in modules.values()} == {ALPHA / RANK}


# --- half a pair ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout, dropped, named", [
    ("kohya", ".lora_up.weight", "lora_up"),
    ("kohya", ".lora_down.weight", "lora_down"),
    ("diffsynth", ".lora_B.weight", "lora_B"),
    ("diffsynth", ".lora_A.weight", "lora_A"),
])
def test_half_a_pair_names_the_file_and_the_missing_key(exported, mm, tmp_path, layout, dropped, named):
    name = f"half_{layout}_{named}.safetensors"
    path = _rewrite(exported[layout], tmp_path / name, lambda s: s.pop(_first(s, dropped)))
    before = _unet_weights(mm)
    for call in (lambda: lora_files.read_lora(path, _config(mm)), lambda: lora_files.fuse_lora(mm, path)):
        with pytest.raises(lora_files.LoRAFileError) as err:
            call()
        text = str(err.value)
        assert name in text and named in text, text
        assert "incomplete" in text and "again" in text, text      # what is wrong, what to do
    assert _unchanged(mm, before)


# --- the right names with the wrong shapes ----------------------------------------------
def _widen_down(suffix):
    def edit(state):
        k = _first(state, suffix)
        state[k] = torch.zeros(state[k].shape[0], state[k].shape[1] + 8)   # input size of another model
    return edit


def _shrink_rank_up(suffix):
    def edit(state):
        k = _first(state, suffix)
        state[k] = state[k][:, :-1].contiguous()                           # rank 3 against rank 4
    return edit


@pytest.mark.parametrize("layout, edit, what", [
    ("kohya", _widen_down(".lora_down.weight"), "this UNet"),
    ("diffsynth", _widen_down(".lora_A.weight"), "this UNet"),
    ("kohya", _shrink_rank_up(".lora_up.weight"), "rank"),
    ("diffsynth", _shrink_rank_up(".lora_B.weight"), "rank"),
])
def test_wrong_shapes_name_the_file_and_the_module(exported, mm, tmp_path, layout, edit, what):
    name = f"shape_{layout}_{what.replace(' ', '_')}.safetensors"
    path = _rewrite(exported[layout], tmp_path / name, edit)
    before = _unet_weights(mm)
    with pytest.raises(lora_files.LoRAFileError) as err:
        lora_files.fuse_lora(mm, path)
    text = str(err.value)
    assert name in text and what in text, text
    assert any(part in text for part in ("to_q", "to_k")), text          # the module
    assert _unchanged(mm, before)                                        # nothing half-applied


def test_good_files_still_fuse(exported, tiny):
    mm = models.load_model_manager(tiny)
    before = _unet_weights(mm)
    assert lora_files.fuse_lora(mm, exported["kohya"]) > 0
    assert not _unchanged(mm, before)
