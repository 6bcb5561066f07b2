"""The challenge's aesthetic score: LAION aesthetic predictor v2 (sac+logos+ava1,
linear MSE head) on a CLIP ViT-L/14 image embedding, through the
``simple-aesthetics-predictor`` package.  An entry whose mean score is below 6
is invalid; the organisers may move that bar, so it is a parameter
(``AestheticScorer(profile, threshold=...)``, ``Scores.with_threshold``).

kolors profile: the real predictor from ModelScope (about 1.2 GB).
tiny profile: the same classes at a tiny size, trained by the kit on the tiny world to rate
clean pictures about 7 and damaged ones (blurred, noisy, burnt, wrong colours) 3 to 5
(``stand_in_scorer``); a stand-in: it tells a clean tiny picture from a damaged one, nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


SCORER_ID = "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
VALIDITY_THRESHOLD = 6.0      # the challenge's bar by default; the organisers may change it


class ScorerError(RuntimeError):
    pass


@dataclass
class Scores:
    per_image: list
    mean: float
    threshold: float
    meaningful: bool

    @property
    def valid(self) -> bool:
        return self.mean >= self.threshold

    def with_threshold(self, threshold: float) -> "Scores":
        """The same scores judged against another bar."""
        return Scores(list(self.per_image), self.mean, _threshold(threshold), self.meaningful)

    def report(self) -> str:
        lines = [f"  image {i + 1}: {s:.3f}" for i, s in enumerate(self.per_image)]
        verdict = ("meets" if self.valid else "is below") + f" the challenge's bar of {self.threshold}"
        head = f"mean aesthetic score {self.mean:.3f}: {verdict}"
        if not self.meaningful:
            head += ("\n(tiny profile: a stand-in with the real predictor's classes, trained on the tiny world "
                     "to rate clean pictures above blurred, noisy, burnt or off-colour ones; "
                     "it says whether a tiny picture is clean, nothing about real pictures)")
        return head + "\n" + "\n".join(lines)

    def to_dict(self) -> dict:
        return {"per_image": self.per_image, "mean": self.mean, "threshold": self.threshold,
                "valid": self.valid, "meaningful": self.meaningful}


def scorer_folder(profile) -> Path:
    if profile.scorer == "tiny":
        from kolors_course.story.stand_in_scorer import check_shipped

        return check_shipped()
    folder = profile.cache_path / SCORER_ID
    if not (folder / "config.json").exists():
        from kolors_course.core.hub import hub_unreachable

        why = hub_unreachable()
        if why:
            raise ScorerError(f"the aesthetic predictor is not in {folder} and cannot be downloaded: {why}. "
                              f"Fetch {SCORER_ID} from ModelScope (about 1.2 GB) into that folder.")
        from modelscope import snapshot_download

        snapshot_download(SCORER_ID, local_dir=str(folder))
    return folder


def _threshold(value) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ScorerError(f"threshold={value!r}: use a number such as 6 (the challenge's bar)") from None
    if not 0 <= t <= 10:
        raise ScorerError(f"threshold={value!r}: aesthetic scores run from 0 to 10")
    return t


class AestheticScorer:
    def __init__(self, profile, device: str | None = None, threshold: float = VALIDITY_THRESHOLD):
        self.threshold = _threshold(threshold)
        from aesthetics_predictor import AestheticsPredictorV2Linear
        from transformers import CLIPImageProcessor

        folder = scorer_folder(profile)
        self.meaningful = profile.scorer != "tiny"
        self.device = device or ("cuda" if profile.device == "cuda" and torch.cuda.is_available() else "cpu")
        self.processor = CLIPImageProcessor.from_pretrained(str(folder))
        self.model = AestheticsPredictorV2Linear.from_pretrained(str(folder)).to(self.device).eval()

    @torch.no_grad()
    def score(self, images) -> Scores:
        if not images:
            raise ScorerError("no images to score")
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        vals = [round(float(v), 4) for v in out.logits.flatten().cpu()]
        return Scores(vals, round(sum(vals) / len(vals), 4), self.threshold, self.meaningful)
