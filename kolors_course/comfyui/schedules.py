"""How close ComfyUI's sampler/scheduler pairs come to DiffSynth's Kolors scheduler,
measured rather than argued (no GPU, no model: a few 1100-element tensors).

DiffSynth's side is DiffSynth's own code: ``diffsynth/schedulers/ddim.py`` loaded from the
installed package, configured as ``diffsynth/pipelines/sdxl_image.py`` configures it for
Kolors (``DIFFSYNTH_KOLORS``).  ComfyUI is not installed, so its side is a transcription
of the code read at the commits in ``nodes.json``'s ``_sources``: ``ModelSamplingDiscrete``
(``comfy/model_sampling.py``: sigmas from the betas, ``sigma(t)`` interpolating
log-sigma, ``timestep(sigma)`` the nearest discrete step), ``make_beta_schedule``
(``comfy/ldm/modules/diffusionmodules/util.py``) and the schedulers of ``comfy/samplers.py``,
on the sampling settings Kolors-MZ sets (``KOLORS_MZ_SAMPLING``, from
``hook_comfyui_kolors_v2.py``).
"""
from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

#: what DiffSynth 1.1.9's SDXLImagePipeline builds when it finds the Kolors text encoder
DIFFSYNTH_KOLORS = {"beta_end": 0.014, "num_train_timesteps": 1100}
DIFFSYNTH_KOLORS_SOURCE = "EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)"
#: what Kolors-MZ's KolorsSDXL writes into ComfyUI's sampling settings
KOLORS_MZ_SAMPLING = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.014, "timesteps": 1100}

SCHEDULERS = ("normal", "simple", "sgm_uniform", "ddim_uniform")


def diffsynth_path(relative: str) -> Path:
    """A file of the installed DiffSynth package, found without importing it (its
    ``__init__`` loads every model class)."""
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("DiffSynth is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / relative


@lru_cache(maxsize=1)
def _ddim_module():
    spec = importlib.util.spec_from_file_location("_kit_diffsynth_ddim", diffsynth_path("schedulers/ddim.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def diffsynth_scheduler():
    """DiffSynth's ``EnhancedDDIMScheduler`` as its Kolors pipeline configures it."""
    return _ddim_module().EnhancedDDIMScheduler(**DIFFSYNTH_KOLORS)


def diffsynth_schedule(steps: int) -> dict:
    """DiffSynth's timesteps (what the UNet sees) and the sigmas of its DDIM updates,
    ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``, ending at 0 (its last step goes to
    ``alpha_prod_t_prev = 1``)."""
    s = diffsynth_scheduler()
    s.set_timesteps(steps)
    ts = [int(t) for t in s.timesteps.tolist()]
    sig = [math.sqrt((1 - s.alphas_cumprod[t]) / s.alphas_cumprod[t]) for t in ts]
    return {"timesteps": ts, "sigmas": sig + [0.0]}


class ComfyModelSampling:
    """ComfyUI's ``ModelSamplingDiscrete`` for given sampling settings (transcribed)."""

    def __init__(self, settings=KOLORS_MZ_SAMPLING):
        import torch

        if settings.get("beta_schedule", "linear") != "linear":
            raise ValueError("only ComfyUI's 'linear' (scaled linear) beta schedule is transcribed here")
        n = settings.get("timesteps", 1000)
        betas = torch.linspace(settings["linear_start"] ** 0.5, settings["linear_end"] ** 0.5, n,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log().float()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        """The nearest discrete timestep (in log-sigma): what the UNet is given."""
        import torch

        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        """Sigma at a (fractional) timestep, interpolating log-sigma."""
        import torch

        t = torch.clamp(torch.as_tensor(timestep).float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def comfy_sigmas(ms: ComfyModelSampling, scheduler: str, steps: int) -> list[float]:
    """ComfyUI's scheduler ``scheduler`` for ``steps`` steps (transcribed from comfy/samplers.py)."""
    import torch

    if scheduler in ("normal", "sgm_uniform"):
        start, end = float(ms.timestep(ms.sigma_max)), float(ms.timestep(ms.sigma_min))
        append_zero = True
        if scheduler == "sgm_uniform":
            ts = torch.linspace(start, end, steps + 1)[:-1]
        else:
            if math.isclose(float(ms.sigma(end)), 0, abs_tol=1e-5):
                steps, append_zero = steps + 1, False
            ts = torch.linspace(start, end, steps)
        sigs = [float(ms.sigma(t)) for t in ts]
        return sigs + [0.0] if append_zero else sigs
    if scheduler == "simple":
        ss = len(ms.sigmas) / steps
        return [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
    if scheduler == "ddim_uniform":
        x, sigs = 1, []
        if math.isclose(float(ms.sigmas[x]), 0, abs_tol=1e-5):
            steps += 1
        else:
            sigs = [0.0]
        ss = max(len(ms.sigmas) // steps, 1)
        while x < len(ms.sigmas):
            sigs.append(float(ms.sigmas[x]))
            x += ss
        return sigs[::-1]
    raise ValueError(f"scheduler {scheduler!r} is not transcribed here (known: {', '.join(SCHEDULERS)})")


def comfy_schedule(steps: int, scheduler: str = "normal", settings=KOLORS_MZ_SAMPLING) -> dict:
    """ComfyUI's sigmas for a scheduler on Kolors-MZ's sampling, and the discrete timesteps
    its model wrapper hands the UNet at each of them (``model_sampling.timestep``)."""
    ms = ComfyModelSampling(settings)
    sigmas = comfy_sigmas(ms, scheduler, steps)
    ts = [int(ms.timestep(s)) for s in sigmas[:-1]]
    return {"timesteps": ts, "sigmas": sigmas, "sigma_max": float(ms.sigma_max)}


def compare(steps: int = 50, scheduler: str = "normal") -> dict:
    """How ComfyUI's ``scheduler`` on Kolors-MZ differs from DiffSynth's Kolors schedule."""
    ds, cf = diffsynth_schedule(steps), comfy_schedule(steps, scheduler)
    same_count = len(ds["timesteps"]) == len(cf["timesteps"])
    rel = [abs(a - b) / b for a, b in zip(cf["sigmas"][:-1], ds["sigmas"][:-1])] if same_count else []
    return {"steps": steps, "scheduler": scheduler,
            "model_calls": (len(ds["timesteps"]), len(cf["timesteps"])),
            "first_timestep": (ds["timesteps"][0], cf["timesteps"][0]),
            "last_timestep": (ds["timesteps"][-1], cf["timesteps"][-1]),
            "same_unet_timesteps": (sum(a == b for a, b in zip(ds["timesteps"], cf["timesteps"]))
                                    if same_count else 0),
            # ComfyUI adds noise * sqrt(1 + sigma^2) (pure noise) only when it starts at sigma_max
            "starts_from_pure_noise": math.isclose(cf["sigmas"][0], cf["sigma_max"], rel_tol=1e-5),
            "max_rel_sigma_diff": max(rel) if rel else None,
            "mean_rel_sigma_diff": sum(rel) / len(rel) if rel else None}


def euler_eps(x_vp, sigmas, eps_fn):
    """ComfyUI's ``euler`` (= ``ddim``) on an EPS model, written in DiffSynth's variables:
    ComfyUI integrates y = x * sqrt(1 + sigma^2) and gives the model y / sqrt(1 + sigma^2);
    ``eps_fn(x_vp, i)`` is the model's noise prediction at step i."""
    y = x_vp * math.sqrt(1 + sigmas[0] ** 2)
    for i in range(len(sigmas) - 1):
        eps = eps_fn(y / math.sqrt(1 + sigmas[i] ** 2), i)
        denoised = y - eps * sigmas[i]                 # EPS.calculate_denoised
        d = (y - denoised) / sigmas[i]                 # k-diffusion to_d
        y = y + d * (sigmas[i + 1] - sigmas[i])
    return y                                           # sigma 0: y is the clean latent
