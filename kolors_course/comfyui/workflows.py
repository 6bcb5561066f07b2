"""The kit's story scene as ComfyUI workflows: Kolors through the Kolors-MZ custom nodes,
the kit's kohya-layout LoRA through core ``LoraLoaderModelOnly``, and optionally a
reference image through a Kolors ControlNet.

Workflows are built in ComfyUI's API format (what ``POST /prompt`` accepts)::

    {"7": {"class_type": "KSampler", "inputs": {"seed": 101, "model": ["2", 0], ...}}, ...}

``to_ui`` gives the editor's format (drop the file onto the canvas); ``write_workflows``
puts both, for the story's first scene, into a submission bundle with a README.

Sampler and scheduler: ``ddim`` + ``normal``
--------------------------------------------
The kit samples with DiffSynth 1.1.9, whose Kolors pipeline replaces its scheduler with
``EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)``
(``diffsynth/pipelines/sdxl_image.py``): a scaled-linear beta schedule from 0.00085 to
0.014 over 1100 training steps, epsilon prediction, and a deterministic DDIM update
(eta 0) at ``round(1099 - i * 1099 / (steps - 1))`` for i = 0..steps-1, the last step
going to the clean image (``alpha_prod_t_prev = 1``) (``diffsynth/schedulers/ddim.py``).

Kolors-MZ gives ComfyUI the same model sampling: ``KolorsSDXL`` sets ``beta_schedule
"linear"`` (ComfyUI's ``make_beta_schedule("linear")`` is ``linspace(sqrt(start),
sqrt(end))**2``, i.e. scaled linear), ``linear_start`` 0.00085, ``linear_end`` 0.014,
``timesteps`` 1100, EPS (``hook_comfyui_kolors_v2.py``).  On it:

- ``normal`` spaces the steps as ``linspace(1099, 0, steps)`` in timestep and appends
  sigma 0: the same spacing, the same first (1099) and last (0) step, and the same
  number of model calls.  (``simple`` and ``sgm_uniform`` stop at t ~ 21 at 50 steps,
  ``ddim_uniform`` starts at 1079 and not at full noise, ``karras``/``exponential`` space
  in sigma: none is DiffSynth's spacing.)
- ``ddim`` is, in current ComfyUI, its Euler sampler (``sampler_object``: ``ksampler("euler",
  ...)``; older versions ran an LDM DDIM sampler with eta 0).  Euler on an EPS model in
  ComfyUI's sigma space (x / sqrt(alpha_bar)) is exactly the DDIM eta-0 update:
  ``x_next = x + (sigma_next - sigma) * eps``.  ``euler`` is the same update under another
  name; ``ddim`` says what is meant.

What still differs (measured by ``kolors_course.comfyui.schedules.compare``):

- DiffSynth rounds every timestep to an integer and takes that step's alpha_bar;
  ComfyUI keeps the fractional timestep and interpolates log-sigma.  The UNet sees the
  same integer timesteps (ComfyUI feeds it the nearest discrete one) at 8, 20 and 50
  steps, but the sigma in each update differs by up to 1% (0.13% on average) at 50 steps,
  and not at all when 1099 / (steps - 1) is a whole number (8 steps).
- The starting noise: ComfyUI draws it on the CPU in float32 (``torch.manual_seed``),
  DiffSynth with a generator on its device in the pipeline's dtype.  On a GPU the two
  noises differ, so one seed gives a different picture (same prompt, LoRA and style, a
  different composition).  ``cuda_noise=True`` adds Kolors-MZ's ``MZ_ApplyCUDAGenerator``,
  which makes ComfyUI draw on CUDA; whether that equals DiffSynth's float16 draw bit for
  bit was not verified, and that node changes noise for the whole ComfyUI process until
  it restarts.
- Numerics: ComfyUI chooses its own dtypes (fp16/bf16) and attention kernels; betas are
  float64 there, float32 in DiffSynth (sigmas agree to ~1e-6).
- The text encoder runs the same recipe in both (ChatGLM3, 256 tokens padded,
  ``hidden_states[-2]``, pooled from the last layer's last token), but Kolors-MZ (and the
  editor's dynamic prompts) replace ``{a|b}`` by a random choice: a prompt with braces is
  no longer the same prompt (``scene_workflow`` warns).
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

from kolors_course.comfyui.validate import check_workflow

SAMPLER_NAME = "ddim"
SCHEDULER = "normal"

#: files the workflows name, per ComfyUI folder, and where to get them.  The names are the
#: ones the README asks for (rename the downloads), so that workflows and folders agree.
UNET_FILE = "Kolors-unet.safetensors"
CHATGLM3_FILE = "chatglm3-fp16.safetensors"
VAE_FILE = "sdxl-vae-fp16-fix.safetensors"
CONTROLNET_FILE = "Kolors-ControlNet-Canny.safetensors"
LORA_FILE = "lora_kohya.safetensors"
REFERENCE_IMAGE = "scene_01_reference.png"

MODEL_FILES = {
    "unet": (UNET_FILE, "Kolors UNet (Kolors-MZ's MZ_KolorsUNETLoaderV2 reads models/unet)",
             "https://huggingface.co/Kwai-Kolors/Kolors/resolve/main/unet/diffusion_pytorch_model.fp16.safetensors "
             "(or the kit's own copy of Kwai-Kolors/Kolors unet/diffusion_pytorch_model.safetensors)"),
    "LLM": (CHATGLM3_FILE, "ChatGLM3 text encoder as one safetensors file (MZ_ChatGLM3Loader reads models/LLM "
            "and lists only .safetensors files)",
            "https://huggingface.co/Kijai/ChatGLM3-safetensors/resolve/main/chatglm3-fp16.safetensors"),
    "vae": (VAE_FILE, "SDXL VAE fp16-fix, the VAE the kit decodes with",
            "ModelScope AI-ModelScope/sdxl-vae-fp16-fix diffusion_pytorch_model.safetensors (the kit's copy), "
            "or Hugging Face madebyollin/sdxl-vae-fp16-fix"),
    "controlnet": (CONTROLNET_FILE, "Kolors' own Canny ControlNet, for the ControlNet workflow only",
                   "https://huggingface.co/Kwai-Kolors/Kolors-ControlNet-Canny (diffusion_pytorch_model.safetensors)"),
}


class _Graph:
    """Builds an API-format workflow; ids are "1", "2", ... in the order nodes are added."""

    def __init__(self):
        self.nodes = {}

    def add(self, class_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        if title:
            self.nodes[node_id]["_meta"] = {"title": title}     # ComfyUI's own API export keeps titles here
        return node_id


def _out(node_id: str, slot: int = 0) -> list:
    return [node_id, slot]


def _warn_dynamic(text: str, which: str):
    if re.search(r"\{[^{}]*\|[^{}]*\}", text):
        warnings.warn(f"the {which} contains {{a|b}}: Kolors-MZ's text encoder (and the editor's dynamic prompts) "
                      "replace it by a random choice, so ComfyUI would not use this exact text", stacklevel=3)


def _kolors_graph(prompt, negative_prompt, width, height, lora_file, lora_strength, unet_file, chatglm3_file,
                  vae_file, cuda_noise):
    for text, which in ((prompt, "prompt"), (negative_prompt, "negative prompt")):
        if not isinstance(text, str):
            raise TypeError(f"the {which} must be text, got {text!r}")
        _warn_dynamic(text, which)
    g = _Graph()
    unet = g.add("MZ_KolorsUNETLoaderV2", "Kolors UNet", unet_name=unet_file)
    model = _out(unet)
    if cuda_noise:
        model = _out(g.add("MZ_ApplyCUDAGenerator", "Noise on CUDA (as DiffSynth on a GPU)", model=model))
    if lora_file is not None:
        model = _out(g.add("LoraLoaderModelOnly", "Story LoRA (kohya layout)", model=model,
                           lora_name=lora_file, strength_model=float(lora_strength)))
    glm = g.add("MZ_ChatGLM3Loader", "ChatGLM3", chatglm3_checkpoint=chatglm3_file)
    pos = g.add("MZ_ChatGLM3_V2", "Prompt", chatglm3_model=_out(glm), text=prompt)
    neg = g.add("MZ_ChatGLM3_V2", "Negative prompt", chatglm3_model=_out(glm), text=negative_prompt)
    latent = g.add("EmptyLatentImage", width=int(width), height=int(height), batch_size=1)
    vae = g.add("VAELoader", "SDXL VAE fp16-fix", vae_name=vae_file)
    return g, model, pos, neg, latent, vae


def _finish(g, model, positive, negative, latent, vae, seed, steps, cfg, sampler_name, scheduler, filename_prefix):
    sampled = g.add("KSampler", model=model, seed=int(seed), steps=int(steps), cfg=float(cfg),
                    sampler_name=sampler_name, scheduler=scheduler, positive=positive, negative=negative,
                    latent_image=_out(latent), denoise=1.0)
    image = g.add("VAEDecode", samples=_out(sampled), vae=_out(vae))
    g.add("SaveImage", images=_out(image), filename_prefix=filename_prefix)
    return g.nodes


def scene_workflow(prompt: str, negative_prompt: str, seed: int, steps: int, cfg: float, width: int, height: int,
                   lora_file: str | None = LORA_FILE, lora_strength: float = 1.0, unet_file: str = UNET_FILE,
                   chatglm3_file: str = CHATGLM3_FILE, vae_file: str = VAE_FILE,
                   filename_prefix: str = "kolors_story/scene", sampler_name: str = SAMPLER_NAME,
                   scheduler: str = SCHEDULER, cuda_noise: bool = False) -> dict:
    """One story image in ComfyUI's API format: Kolors-MZ UNet and ChatGLM3 loaders, its
    text encoder for the prompt and the negative prompt, the LoRA at ``lora_strength``
    (``None`` as ``lora_file``: the base model), an empty latent of the scene's size,
    KSampler (``ddim`` + ``normal``, see the module notes), VAE decode with the fp16-fix
    VAE, SaveImage.  ``lora_strength`` is the kit's LoRA scale: both multiply the file's
    alpha / rank (1.0 = as trained)."""
    g, model, pos, neg, latent, vae = _kolors_graph(prompt, negative_prompt, width, height, lora_file,
                                                    lora_strength, unet_file, chatglm3_file, vae_file, cuda_noise)
    return _finish(g, model, _out(pos), _out(neg), latent, vae, seed, steps, cfg, sampler_name, scheduler,
                   filename_prefix)


def controlnet_workflow(prompt: str, negative_prompt: str, seed: int, steps: int, cfg: float, width: int,
                        height: int, image: str = REFERENCE_IMAGE, control_strength: float = 0.5,
                        start_percent: float = 0.0, end_percent: float = 1.0,
                        control_net_file: str = CONTROLNET_FILE, preprocessor: str | None = "canny",
                        canny_low: float = 0.4, canny_high: float = 0.8, controlnet_loader: str = "kolors",
                        lora_file: str | None = LORA_FILE, lora_strength: float = 1.0, unet_file: str = UNET_FILE,
                        chatglm3_file: str = CHATGLM3_FILE, vae_file: str = VAE_FILE,
                        filename_prefix: str = "kolors_story/scene_controlnet", sampler_name: str = SAMPLER_NAME,
                        scheduler: str = SCHEDULER, cuda_noise: bool = False) -> dict:
    """The scene workflow guided by a reference image (a file in ComfyUI's ``input``
    folder): ``LoadImage`` -> core ``Canny`` (``preprocessor=None``: the image already is
    the control map) -> core ``ControlNetApplyAdvanced`` on both prompts at
    ``control_strength`` between ``start_percent`` and ``end_percent`` of the sampling.

    ``controlnet_loader="kolors"``: Kolors-MZ's ``MZ_KolorsControlNetLoader``, for Kolors'
    own ControlNets (Kwai-Kolors/Kolors-ControlNet-Canny, -Depth, -Pose).  ``"sdxl"``: core
    ``ControlNetLoader`` + ``MZ_KolorsControlNetPatch`` (the patch Kolors-MZ provides for
    SDXL ControlNets); the kit's DiffSynth lesson uses an SDXL ControlNet-Union, which is
    a different model from Kolors' Canny one, so results differ from the notebook's."""
    if controlnet_loader not in ("kolors", "sdxl"):
        raise ValueError(f"controlnet_loader={controlnet_loader!r}: use 'kolors' or 'sdxl'")
    if preprocessor not in (None, "canny"):
        raise ValueError(f"preprocessor={preprocessor!r}: use 'canny' or None (the image is the control map)")
    g, model, pos, neg, latent, vae = _kolors_graph(prompt, negative_prompt, width, height, lora_file,
                                                    lora_strength, unet_file, chatglm3_file, vae_file, cuda_noise)
    hint = _out(g.add("LoadImage", "Reference image", image=image))
    if preprocessor == "canny":
        hint = _out(g.add("Canny", image=hint, low_threshold=float(canny_low), high_threshold=float(canny_high)))
    if controlnet_loader == "kolors":
        cnet = _out(g.add("MZ_KolorsControlNetLoader", "Kolors ControlNet", control_net_name=control_net_file))
    else:
        loaded = g.add("ControlNetLoader", "SDXL ControlNet", control_net_name=control_net_file)
        unet_id = next(i for i, n in g.nodes.items() if n["class_type"] == "MZ_KolorsUNETLoaderV2")
        cnet = _out(g.add("MZ_KolorsControlNetPatch", control_net=_out(loaded), model=_out(unet_id)))
    applied = g.add("ControlNetApplyAdvanced", positive=_out(pos), negative=_out(neg), control_net=cnet,
                    image=hint, strength=float(control_strength), start_percent=float(start_percent),
                    end_percent=float(end_percent))
    return _finish(g, model, _out(applied, 0), _out(applied, 1), latent, vae, seed, steps, cfg, sampler_name,
                   scheduler, filename_prefix)


def to_ui(api: dict, object_info=None, extra: dict | None = None) -> dict:
    """The editor's format of an API-format workflow (see ``uiformat``)."""
    from kolors_course.comfyui.uiformat import api_to_ui

    return api_to_ui(api, object_info, extra)


def expected_files(lora_files=(LORA_FILE,), images=(REFERENCE_IMAGE,)) -> dict:
    """Folder -> file names for ``validate_workflow(files=...)``: what a bundle ships (the
    LoRA, the reference image) and the model files under the names the README asks for."""
    files = {folder: [name] for folder, (name, _, _) in MODEL_FILES.items()}
    files["loras"] = list(lora_files)
    files["input"] = list(images)
    return files


def _scene_settings(story, records, settings) -> dict:
    """Scene 1 as it was generated: its record (prompt, negative, seed, steps, cfg, size)
    when there is one, else the story and the settings."""
    if records:
        r = records[0]
        return {"prompt": r["prompt"], "negative_prompt": r["negative_prompt"], "seed": r["seed"],
                "steps": r["steps"], "cfg": r["cfg_scale"], "width": r["width"], "height": r["height"]}
    return {"prompt": story.prompt(0), "negative_prompt": story.negative, "seed": story.scenes[0].seed,
            "steps": settings["steps"], "cfg": settings["cfg_scale"], "width": settings["width"],
            "height": settings["height"]}


def _save_reference(bundle: Path, records, folder: Path) -> bool:
    """Scene 1's image as the ControlNet reference: from its record, else ``images/01.png``."""
    target = folder / REFERENCE_IMAGE
    image = records[0].get("image") if records else None
    if hasattr(image, "save"):
        image.save(target)
        return True
    src = bundle / "images" / "01.png"
    if src.is_file():
        shutil.copyfile(src, target)
        return True
    return False


def write_workflows(bundle_dir, story, records, settings, lora_strength) -> dict:
    """Write ``comfyui/`` into a submission bundle: ``scene_01_api.json`` and
    ``scene_01_controlnet_api.json`` (POST to ``/prompt``), their UI-format counterparts
    ``scene_01.json`` / ``scene_01_controlnet.json`` (drop onto the canvas), scene 1's
    image as the ControlNet reference and a README.  Every workflow is validated against
    the shipped definitions and the files the README names before it is written.

    The LoRA is the bundle's ``*_kohya.safetensors`` (none in the bundle: base-model
    workflows); ``lora_strength`` ``None`` means ``settings["lora_scale"]``.  Returns the
    written paths by name."""
    bundle = Path(bundle_dir)
    folder = bundle / "comfyui"
    folder.mkdir(parents=True, exist_ok=True)
    scene = _scene_settings(story, records, settings)
    kohya = sorted(p.name for p in bundle.glob("*_kohya.safetensors"))
    lora_file = kohya[0] if kohya else None
    strength = settings.get("lora_scale", 1.0) if lora_strength is None else lora_strength
    name = Path(getattr(story, "source", "") or "story").stem or "story"
    has_reference = _save_reference(bundle, records, folder)
    common = dict(scene, lora_file=lora_file, lora_strength=strength)
    api = {"scene_01": scene_workflow(**common, filename_prefix=f"{name}/scene_01"),
           "scene_01_controlnet": controlnet_workflow(**common, filename_prefix=f"{name}/scene_01_controlnet")}
    files = expected_files(lora_files=kohya)
    written = {}
    for key, workflow in api.items():
        check_workflow(workflow, files=files)      # never ship a workflow the definitions reject
        extra = {"kolors_course": {"story": story.title, "scene": 1, "seed": scene["seed"],
                                   "sampler": f"{SAMPLER_NAME} + {SCHEDULER}: DiffSynth's Kolors DDIM schedule "
                                              "(see README.md)"}}
        ui = to_ui(workflow, extra=extra)
        check_workflow(ui, files=files)
        for suffix, data in (("_api", workflow), ("", ui)):
            path = folder / f"{key}{suffix}.json"
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written[f"{key}{suffix}"] = path
    if has_reference:
        written["reference"] = folder / REFERENCE_IMAGE
    readme = folder / "README.md"
    readme.write_text(readme_text(story, scene, lora_file, strength, has_reference), encoding="utf-8")
    written["readme"] = readme
    return written


def readme_text(story, scene: dict, lora_file: str | None, strength: float, has_reference: bool = True) -> str:
    """The bundle's ``comfyui/README.md``: nodes to install, files and folders, how to load."""
    lora_row = (f"| `{lora_file}` (in this bundle) | `ComfyUI/models/loras/{lora_file}` | the story LoRA, kohya "
                f"layout, read by core `LoraLoaderModelOnly` at strength {strength:g} |"
                if lora_file else "| (no LoRA in this bundle) | | the workflows use the base model |")
    ref_row = (f"| `comfyui/{REFERENCE_IMAGE}` (in this bundle) | `ComfyUI/input/{REFERENCE_IMAGE}` | scene 1, "
               "the ControlNet workflow's reference image |"
               if has_reference else f"| your reference image | `ComfyUI/input/{REFERENCE_IMAGE}` | the ControlNet "
                                     "workflow's reference image |")
    rows = [lora_row] + [f"| {src} | `ComfyUI/models/{folder}/{name}` | {what} |"
                         for folder, (name, what, src) in MODEL_FILES.items()] + [ref_row]
    lines = [
        f"# ComfyUI workflows: {story.title}, scene 1", "",
        f"Scene 1 of the story as ComfyUI workflows, with its exact prompt, negative prompt, seed "
        f"{scene['seed']}, {scene['steps']} steps, cfg {scene['cfg']:g} and size {scene['width']}x{scene['height']}.",
        "", f"- prompt: {scene['prompt']}", f"- negative prompt: {scene['negative_prompt'] or '(none)'}",
        f"- KSampler: `{SAMPLER_NAME}` / `{SCHEDULER}`, seed {scene['seed']} (control after generate: fixed)"
        + (f"; LoRA `{lora_file}` at strength {strength:g}" if lora_file else "; no LoRA (base model)"), "",
        "| file | what it is |", "| --- | --- |",
        "| `scene_01.json` | the workflow in the editor's format: drag it onto the ComfyUI canvas |",
        "| `scene_01_api.json` | the same in the API format: POST it to `/prompt` |",
        "| `scene_01_controlnet.json`, `scene_01_controlnet_api.json` | scene 1 again, its composition kept "
        "by a Canny ControlNet on the reference image |", "",
        "## 1. Custom nodes", "",
        "ComfyUI has no Kolors support of its own. Install **ComfyUI-Kolors-MZ** "
        "(https://github.com/MinusZoneAI/ComfyUI-Kolors-MZ) into `ComfyUI/custom_nodes/` (or through "
        "ComfyUI-Manager), keep ComfyUI itself up to date (Kolors-MZ needs a ComfyUI that reads the model's "
        "1100-step sampling settings), and restart ComfyUI. The workflows use its `MZ_KolorsUNETLoaderV2`, "
        "`MZ_ChatGLM3Loader`, `MZ_ChatGLM3_V2` and `MZ_KolorsControlNetLoader`; everything else is core "
        "ComfyUI (`LoraLoaderModelOnly`, `EmptyLatentImage`, `KSampler`, `VAELoader`, `VAEDecode`, "
        "`SaveImage`, `LoadImage`, `Canny`, `ControlNetApplyAdvanced`).", "",
        "## 2. Files and folders", "",
        "Put each file where the table says, under the name it gives (rename downloads), or pick your own "
        "names in the loader nodes after loading.", "",
        "| file | goes to | what it is |", "| --- | --- | --- |", *rows, "",
        "## 3. Load and run", "",
        "- In the editor: drag `scene_01.json` onto the canvas, check the file names in the loader nodes, "
        "press Queue.",
        "- Through the API, with ComfyUI running on port 8188:", "",
        "```python",
        "import json, urllib.request",
        "",
        'workflow = json.load(open("comfyui/scene_01_api.json", encoding="utf-8"))',
        'request = urllib.request.Request("http://127.0.0.1:8188/prompt",',
        '                                 data=json.dumps({"prompt": workflow}).encode("utf-8"),',
        '                                 headers={"Content-Type": "application/json"})',
        "print(urllib.request.urlopen(request).read().decode())   # a prompt_id, or the nodes ComfyUI rejects",
        "```", "",
        "- To check a workflow against your own ComfyUI's nodes and files first, with the course kit:",
        "  `curl http://127.0.0.1:8188/object_info > object_info.json`, then",
        "  `python -m kolors_course.comfyui.validate comfyui/scene_01_api.json object_info.json`.", "",
        "## 4. How close to the kit's images", "",
        f"KSampler uses `{SAMPLER_NAME}` with the `{SCHEDULER}` scheduler: on Kolors-MZ's model sampling "
        "(scaled-linear betas 0.00085 to 0.014 over 1100 steps, epsilon prediction) this is the deterministic "
        "DDIM update DiffSynth's Kolors pipeline runs, at the same timesteps (1099 down to 0, evenly spaced). "
        "The noise each side draws from the seed differs (ComfyUI draws it on the CPU, DiffSynth on the GPU), "
        "so ComfyUI makes a picture of the same prompt, LoRA and style but not the same picture; sigmas in "
        "each step also differ slightly (DiffSynth rounds timesteps to integers, under 1% at 50 steps).",
    ]
    return "\n".join(lines) + "\n"
