"""A dress rehearsal of the kolors profile on a CPU, with Kolors-sized random weights.

The weights' values do not matter for whether the kolors code path works, how much
memory it needs or how fast it runs, so ``write_weights`` writes random weights of the
real sizes in the layout and formats of the real download:

- ``Kwai-Kolors/Kolors/unet/diffusion_pytorch_model.safetensors`` with diffusers key
  names (what DiffSynth's ``from_diffusers`` converter reads) and ``unet/config.json``;
- ``Kwai-Kolors/Kolors/text_encoder/``: ChatGLM3-6B as Kolors publishes it, a Hugging
  Face folder with the real ``config.json`` (``ChatGLMModel``), seven
  ``pytorch_model-0000N-of-00007.bin`` shards (torch.save of plain tensor dicts, names
  prefixed ``transformer.`` like the published ones) with ``pytorch_model.bin.index.json``,
  and the tokenizer files (the real ones, shipped inside the diffsynth wheel);
- ``AI-ModelScope/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors`` + ``config.json``.

Everything is bfloat16 (CPUs lack float16 convolutions), drawn tensor by tensor and
streamed to disk, so the writer never holds more than one shard (about 1.8 GB).
``rehearsal.json`` is written last: a write that was killed is done again.

``REHEARSAL`` is the kolors profile with only its numbers changed for a CPU; ``kolors-course
rehearsal`` (``make rehearsal``) writes the weights and runs notebooks 00-04 on it through
the normal runner.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

from kolors_course.core.profiles import KOLORS
import kolors_course.models.tiny as tiny_models

FORMAT_VERSION = 2          # 2: with the SDXL ControlNet-Union (notebook 05)
MARKER = "rehearsal.json"
TEXT_ENCODER_SHARDS = 7
SEED = 20240802

#: the kolors profile with only its numbers changed for a CPU: bfloat16, 128 px, 2 steps,
#: 3 training steps at 128 px, the synthetic data set, the tiny stand-in scorer, and the
#: random Kolors-sized weights under cache/rehearsal (never downloaded)
REHEARSAL = KOLORS.with_(
    name="kolors-rehearsal", model_source="rehearsal", cache_dir="cache/rehearsal",
    device="cpu", dtype="bfloat16", memory_mode="full",
    height=128, width=128, steps=2,
    dataset="synthetic", min_side=128,
    train_resolution=128, train_steps=3,
    scorer="tiny",
    story_sizes=False,                # the story files' 1024 px / 50 steps are not for a CPU
)

#: the published Kolors text encoder's config.json (ChatGLM3-6B-base, as Kolors ships it)
KOLORS_TEXT_ENCODER_JSON = {
    "_name_or_path": "THUDM/chatglm3-6b-base",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096, "kv_channels": 128,
    "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 32, "num_layers": 28, "original_rope": True, "padded_vocab_size": 65024,
    "post_layer_norm": True, "rmsnorm": True, "seq_length": 32768, "use_cache": True,
    "torch_dtype": "float16", "transformers_version": "4.30.2", "tie_word_embeddings": False,
    "eos_token_id": 2, "pad_token_id": 0,
}

#: the published sdxl-vae-fp16-fix config.json
SDXL_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.18.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": False, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "scaling_factor": 0.13025,
}


class RehearsalError(RuntimeError):
    pass


# --- what to write: names and shapes, from models built on the meta device ----------------
def _unet_shapes(config: dict) -> dict:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if k != "_class_name"})
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def _vae_shapes(config: dict) -> dict:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in vae.state_dict().items()}


def _controlnet_shapes(config: dict) -> dict:
    from diffusers import ControlNetUnionModel

    with torch.device("meta"):
        model = ControlNetUnionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def controlnet_config(sizes: str = "kolors") -> dict:
    """The ControlNet-Union's config.json: the promax layout, Kolors-sized or tiny."""
    from kolors_course.models.random_weights import KOLORS_CONTROLNET_CONFIG

    if sizes == "kolors":
        return dict(KOLORS_CONTROLNET_CONFIG)
    return {"_class_name": "ControlNetUnionModel", **tiny_models._jsonable(tiny_models.controlnet_diffusers_config())}


def _text_encoder_shapes(config: dict) -> dict:
    """``transformer.``-prefixed names, as in the published shards (ChatGLM's base_model_prefix)."""
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    cfg = ChatGLMConfig(**{k: v for k, v in config.items()
                           if k not in ("architectures", "model_type", "auto_map", "_name_or_path",
                                        "transformers_version", "torch_dtype")})
    with torch.device("meta"):
        model = ChatGLMModel(cfg, empty_init=False)
    return {f"transformer.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


# --- values ----------------------------------------------------------------------------------
def random_tensor(name: str, shape: tuple, gen: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """Small random values that keep activations finite; norms 1, biases 0.

    Matrices and convolutions: normal / sqrt(fan_in) (variance-preserving).  Every
    norm weight (GroupNorm, LayerNorm, ChatGLM's RMSNorm) is 1.  ChatGLM's rotary
    ``inv_freq`` buffer gets its computed value.
    """
    if name.endswith("inv_freq"):
        dim = 2 * shape[0]
        return (1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).to(dtype)
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        t = torch.empty(shape, dtype=dtype)
        t.normal_(0.0, 1.0 / max(fan_in, 1) ** 0.5, generator=gen)
        return t
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_safetensors_streamed(path: Path, shapes: dict, make, dtype=torch.bfloat16) -> int:
    """A safetensors file written one tensor at a time (the format: 8-byte header length,
    JSON header, raw little-endian data); ``make(name, shape)`` draws each tensor.
    Returns the bytes written."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    header, offset = {}, 0
    names = sorted(shapes)
    for name in names:
        n = 1
        for s in shapes[name]:
            n *= s
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + n * itemsize]}
        offset += n * itemsize
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = make(name, shapes[name]).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shapes[name]):
                raise RehearsalError(f"{name}: drew {tuple(t.shape)}, expected {shapes[name]}")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del t
    return 8 + len(blob) + offset


def _shard_plan(shapes: dict, n_shards: int, itemsize: int = 2) -> list[list[str]]:
    """Names in model order split into ``n_shards`` shards of about equal size."""
    def layer_key(name):
        parts = name.split(".")
        # embedding, rotary, then the layers in number order, then the final norm and output layer
        if "layers" in parts:
            i = parts.index("layers")
            return (1, int(parts[i + 1]), name)
        if "embedding" in parts or "rotary_pos_emb" in parts:
            return (0, 0, name)
        return (2, 0, name)

    names = sorted(shapes, key=layer_key)
    sizes = {n: itemsize * _numel(shapes[n]) for n in names}
    total = sum(sizes.values())
    shards, current, acc = [], [], 0
    for name in names:
        # a new shard starts where the boundary falls nearer before this tensor than after it
        boundary = total * (len(shards) + 1) / n_shards
        if current and len(shards) < n_shards - 1 and acc + sizes[name] / 2 > boundary:
            shards.append(current)
            current = []
        current.append(name)
        acc += sizes[name]
    if current:
        shards.append(current)
    return shards


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_text_encoder(folder: Path, config: dict, gen: torch.Generator, n_shards: int = TEXT_ENCODER_SHARDS,
                       dtype=torch.bfloat16) -> int:
    """The ChatGLM folder as published: config.json, .bin shards + index, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = _text_encoder_shapes(config)
    plan = _shard_plan(shapes, n_shards)
    if len(plan) != n_shards:
        raise RehearsalError(f"the text encoder split into {len(plan)} shards, not {n_shards}")
    weight_map, total = {}, 0
    for i, names in enumerate(plan, 1):
        fname = f"pytorch_model-{i:05d}-of-{n_shards:05d}.bin"
        shard = {n: random_tensor(n, shapes[n], gen, dtype) for n in names}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        torch.save(shard, folder / fname)
        del shard
        weight_map.update({n: fname for n in names})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_files():
        shutil.copyfile(f, folder / f.name)
    return total


def tokenizer_files() -> list[Path]:
    """The real Kolors tokenizer files, as shipped inside the diffsynth wheel."""
    import diffsynth

    folder = Path(diffsynth.__file__).parent / "tokenizer_configs" / "kolors" / "tokenizer"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise RehearsalError(f"no tokenizer files in {folder}")
    return files


# --- the whole cache ---------------------------------------------------------------------------
def cache_complete(cache: Path, sizes: str | None = None) -> bool:
    """The marker is there (written last) with every file it lists; ``sizes`` None: either size."""
    marker = cache / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("format_version") == FORMAT_VERSION and sizes in (None, info.get("sizes")) and all(
        (cache / rel).is_file() for rel in info.get("files", []))


def configs(sizes: str = "kolors") -> tuple[dict, dict, dict]:
    """(unet, vae, text encoder) config.json contents, Kolors-sized or tiny (for tests)."""
    from kolors_course.models.random_weights import KOLORS_UNET_CONFIG

    if sizes == "kolors":
        return dict(KOLORS_UNET_CONFIG), dict(SDXL_VAE_JSON), dict(KOLORS_TEXT_ENCODER_JSON)
    if sizes == "tiny":
        unet = {"_class_name": "UNet2DConditionModel", **tiny_models._jsonable(tiny_models.unet_diffusers_config())}
        vae = {"_class_name": "AutoencoderKL", **tiny_models._jsonable(tiny_models.vae_diffusers_config())}
        te = dict(KOLORS_TEXT_ENCODER_JSON)
        te.update({k: v for k, v in tiny_models.text_encoder_config().items() if k != "torch_dtype"})
        return unet, vae, te
    raise ValueError("sizes must be 'kolors' or 'tiny'")


def write_weights(cache: str | os.PathLike | None = None, sizes: str = "kolors", force: bool = False,
                  text_encoder_shards: int = TEXT_ENCODER_SHARDS, quiet: bool = False) -> Path:
    """Write random weights of the real Kolors sizes (or tiny ones) under ``cache``, once.

    Same relative paths as ``models.model_files``; the marker ``rehearsal.json`` is
    written last, so a killed write is redone on the next call.
    """
    cache = Path(cache) if cache is not None else REHEARSAL.cache_path
    if not force and cache_complete(cache, sizes):
        if not quiet:
            print(f"rehearsal weights ({sizes}) already complete in {cache}")
        return cache
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    (cache / MARKER).unlink(missing_ok=True)
    need_gb = 21.5 if sizes == "kolors" else 0.1
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free / 2**30
    if free < need_gb:
        raise RehearsalError(f"{cache}: {free:.1f} GB free, about {need_gb:.0f} GB needed for the weights")
    unet_cfg, vae_cfg, te_cfg = configs(sizes)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()

    def draw(name, shape):
        return random_tensor(name, shape, gen)

    unet_path = cache / tiny_models.UNET_REL
    say(f"writing the UNet ({sizes}) to {unet_path} ...")
    n_unet = write_safetensors_streamed(unet_path, _unet_shapes(unet_cfg), draw)
    unet_path.with_name("config.json").write_text(json.dumps(unet_cfg, indent=2))
    vae_path = cache / tiny_models.VAE_REL
    say(f"writing the VAE to {vae_path} ...")
    n_vae = write_safetensors_streamed(vae_path, _vae_shapes(vae_cfg), draw)
    vae_path.with_name("config.json").write_text(json.dumps(vae_cfg, indent=2))
    cn_path = cache / tiny_models.CONTROLNET_REL
    cn_cfg = controlnet_config(sizes)
    say(f"writing the ControlNet-Union to {cn_path} ...")
    n_cn = write_safetensors_streamed(cn_path, _controlnet_shapes(cn_cfg), draw)
    cn_path.with_name("config.json").write_text(json.dumps(cn_cfg, indent=2))
    te_dir = cache / tiny_models.TEXT_ENCODER_REL
    say(f"writing the text encoder to {te_dir} ({text_encoder_shards} shards) ...")
    for old in te_dir.glob("pytorch_model*"):
        old.unlink()
    n_te = write_text_encoder(te_dir, te_cfg, gen, text_encoder_shards)
    files = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.name != MARKER)
    info = {"format_version": FORMAT_VERSION, "sizes": sizes, "seed": SEED, "dtype": "bfloat16",
            "bytes": {"unet": n_unet, "vae": n_vae, "text_encoder": n_te, "controlnet": n_cn},
            "seconds": round(time.perf_counter() - t0, 1), "files": files,
            "note": "random weights of the Kolors sizes in the real download's layout, by kolors_course.models.rehearsal"}
    (cache / MARKER).write_text(json.dumps(info, indent=2))
    say(f"weights written in {info['seconds']} s: UNet {n_unet / 1e9:.2f} GB, text encoder "
        f"{n_te / 1e9:.2f} GB, VAE {n_vae / 1e9:.2f} GB, ControlNet-Union {n_cn / 1e9:.2f} GB")
    return cache


# --- the rehearsal ---------------------------------------------------------------------------------
#: notebook parameters that shorten the sweeps and the training set for a CPU (the code path is
#: the same): every caption costs one pass of the 6-billion-parameter text encoder
NOTEBOOK_PARAMETERS = {"seeds": [0, 1], "cfg_values": [1.0, 4.0], "step_values": [1, 2], "strength_values": [0.0, 1.0],
                       "limit": 4, "control_strengths": [0.0, 1.0]}


def peak_rss_gb() -> float:
    """Peak resident memory of this process and of its finished children (the kernels), GB."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024 / 1e9      # ru_maxrss is in KiB on Linux


def run_rehearsal(out: str | os.PathLike = "runs/rehearsal", notebooks: list[str] | None = None,
                  cache: str | os.PathLike | None = None, parameters: dict | None = None,
                  log_output: bool = False) -> int:
    """Write the weights (once) and run the notebooks on ``kolors-rehearsal``; 0 when all pass."""
    from kolors_course.core.paths import project_path
    from kolors_course.runner import format_summary, run_notebooks

    from kolors_course.core.state import environ
    from kolors_course.runner import declared_parameters, resolve_notebooks

    # the kernels inherit the cache folder; put back when the rehearsal ends
    with environ(KOLORS_COURSE_CACHE=str(project_path(cache)) if cache is not None
                 else os.environ.get("KOLORS_COURSE_CACHE")):
        t0 = time.perf_counter()
        write_weights(REHEARSAL.cache_path)
        write_s = time.perf_counter() - t0
        declared = set().union(*(declared_parameters(nb) for nb in resolve_notebooks(notebooks)))
        params = {k: v for k, v in NOTEBOOK_PARAMETERS.items() if k in declared}   # for the notebooks run
        params.update(parameters or {})
        results = run_notebooks(notebooks, out=out, profile=REHEARSAL.name, parameters=params,
                                log_output=log_output)
    print()
    print(format_summary(results))
    report = {"profile": REHEARSAL.name, "weights_seconds": round(write_s, 1),
              "notebook_seconds": round(sum(r.seconds for r in results), 1),
              "peak_rss_gb": round(peak_rss_gb(), 2),
              "results": [{"notebook": r.notebook, "status": r.status, "seconds": r.seconds,
                           "error": r.error} for r in results]}
    path = project_path(out) / "rehearsal.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"weights ready in {write_s:.0f} s; notebooks {report['notebook_seconds']:.0f} s; "
          f"peak resident memory of one process {report['peak_rss_gb']:.1f} GB; report {path}")
    failed = [r for r in results if r.status != "ok"]
    return 1 if failed else 0


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="kolors-course rehearsal", description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", help="names such as 01 (default: all)")
    p.add_argument("--out", default="runs/rehearsal")
    p.add_argument("--cache", default=None, help="weights folder (default cache/rehearsal)")
    p.add_argument("--weights-only", action="store_true", help="only write the weights")
    p.add_argument("--log-output", action="store_true")
    args = p.parse_args(argv)
    if args.weights_only:
        from kolors_course.core.paths import project_path
        write_weights(project_path(args.cache) if args.cache else None)
        return 0
    return run_rehearsal(args.out, args.notebooks or None, args.cache, log_output=args.log_output)


if __name__ == "__main__":
    sys.exit(main())
