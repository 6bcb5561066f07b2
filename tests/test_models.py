import json
import shutil
import time

import numpy as np
import pytest

import kolors_course.models.loading as models
import kolors_course.models.tiny as tiny_models
from kolors_course.core.profiles import choose_profile


def test_tiny_files_use_the_real_layout(tiny):
    files = models.ensure_weights(tiny)
    root = tiny.cache_path
    # the same relative paths the kolors profile downloads
    assert files.unet == root / "Kwai-Kolors/Kolors/unet/diffusion_pytorch_model.safetensors"
    assert files.vae == root / "AI-ModelScope/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors"
    cfg = json.loads((files.text_encoder / "config.json").read_text())
    assert cfg["architectures"] == ["ChatGLMModel"]
    assert not files.missing()
    # diffusers names, as in the real Kolors UNet file
    from safetensors import safe_open
    with safe_open(str(files.unet), "pt") as f:
        keys = set(f.keys())
    assert "encoder_hid_proj.weight" in keys and "add_embedding.linear_1.weight" in keys
    assert any(k.startswith("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") for k in keys)


def test_tiny_build_is_deterministic(tmp_path):
    a = tiny_models.build_tiny_models(tmp_path / "a")
    b = tiny_models.build_tiny_models(tmp_path / "b")
    for rel in (tiny_models.UNET_REL, tiny_models.VAE_REL, tiny_models.TEXT_ENCODER_REL / "model.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_pipeline_is_kolors_with_tiny_parts(tiny_pipe):
    from diffsynth.prompters import KolorsPrompter
    assert isinstance(tiny_pipe.prompter, KolorsPrompter)
    assert type(tiny_pipe.unet).__name__ == "TinyKolorsUNet"
    assert tiny_pipe.unet.is_kolors
    n = sum(p.numel() for p in tiny_pipe.unet.parameters())
    assert 100_000 < n < 10_000_000          # the shipped tiny UNet: 5.6 M (Kolors': 2.6 B)


def test_same_seed_gives_bit_identical_images_across_loads(tiny):
    from kolors_course.generation.text2image import generate
    a = generate(models.load_pipeline(tiny), "一只猫", seed=7)
    b = generate(models.load_pipeline(tiny), "一只猫", seed=7)
    c = generate(models.load_pipeline(tiny), "一只猫", seed=8)
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_kolors_profile_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("KOLORS_COURSE_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    prof = choose_profile("kolors")
    t0 = time.perf_counter()
    with pytest.raises(models.MissingWeightsError) as err:
        models.ensure_weights(prof)
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert "diffusion_pytorch_model.safetensors" in msg
    assert "kolors-course fetch --profile kolors" in msg
    assert "profile='tiny'" in msg
    assert elapsed < 30, f"took {elapsed:.1f} s: it must not hang waiting for the network"
    assert not (tmp_path / "empty" / "Kwai-Kolors").exists()


def test_offline_flag_short_circuits(tmp_path, monkeypatch):
    monkeypatch.setenv("KOLORS_COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.MissingWeightsError, match="offline mode"):
        models.ensure_weights(choose_profile("kolors"))


def test_no_download_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("KOLORS_COURSE_CACHE", str(tmp_path))
    with pytest.raises(models.MissingWeightsError, match="missing"):
        models.ensure_weights(choose_profile("kolors"), download=False)


def _copy_tiny(tiny, dst):
    shutil.copytree(models.ensure_weights(tiny).unet.parents[3], dst)
    return choose_profile("tiny", cache_dir=str(dst))


def test_truncated_unet_is_a_clear_error(tiny, tmp_path):
    prof = _copy_tiny(tiny, tmp_path / "c")
    unet = models.model_files(prof).unet
    unet.write_bytes(unet.read_bytes()[:1000])
    with pytest.raises(models.ModelLoadError, match="could not load the UNet"):
        models.load_model_manager(prof)


def test_text_encoder_with_missing_weights_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    prof = _copy_tiny(tiny, tmp_path / "c")
    st = models.model_files(prof).text_encoder / "model.safetensors"
    state = load_file(str(st))
    state.pop(sorted(k for k in state if "dense" in k)[0])
    save_file(state, str(st))
    with pytest.raises(models.ModelLoadError, match="lacks 1 weights"):
        models.load_model_manager(prof)


def test_check_loaded_names_what_is_missing():
    class MM:
        model_name = ["sdxl_unet"]
    with pytest.raises(models.ModelLoadError, match="kolors_text_encoder"):
        models.check_loaded(MM(), ["sdxl_unet", "kolors_text_encoder"])


def test_kolors_profile_on_cpu_machine_says_to_use_tiny(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="tiny"):
        models._default_device(choose_profile("kolors"))


def test_unrecognised_controlnet_is_an_error(tiny, tmp_path):
    from safetensors.torch import save_file
    import torch
    bogus = tmp_path / "controlnet.safetensors"
    save_file({"x": torch.zeros(2)}, str(bogus))
    with pytest.raises(models.ModelLoadError, match="ControlNet"):
        models.load_pipeline(tiny, controlnet=str(bogus))
    with pytest.raises(models.MissingWeightsError, match="no ControlNet file"):
        models.load_pipeline(tiny, controlnet=str(tmp_path / "absent.safetensors"))


def test_offload_memory_mode_runs_the_same_path_and_gives_the_same_image(tiny, tiny_pipe):
    """The offload mode (DiffSynth moving each model to the device only while it runs) on the CPU:
    the same functions and the same picture; on a GPU it trades time for memory (bench/gpu.py)."""
    import numpy as np

    from kolors_course.generation.text2image import generate
    off = models.load_pipeline(tiny.with_(memory_mode="offload"))
    assert off.cpu_offload and off.memory_mode == "offload" and not tiny_pipe.cpu_offload
    a = np.asarray(generate(off, "一个红色的圆形", seed=5))
    b = np.asarray(generate(tiny_pipe, "一个红色的圆形", seed=5))
    assert np.array_equal(a, b)


def test_a_first_load_on_a_fresh_cache_prints_no_library_notices(tmp_path):
    """Notebook 00's first load fills the cache (the text encoder rebuilt from its seed): nothing of
    the libraries' own chatter may reach the learner's first notebook (it printed transformers'
    "`torch_dtype` is deprecated" twice)."""
    import os
    import subprocess
    import sys

    code = "import kolors_course as kc; kc.load_pipeline(kc.choose_profile('tiny', verbose=False))"
    env = dict(os.environ, KOLORS_COURSE_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="default")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if line.strip() and "pynvml" not in line]
    assert not noise, noise
