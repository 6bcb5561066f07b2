"""Picture stories: a small YAML file of 8 scenes, composed into prompts with the
course's template (style, framing, character, place, action), and generated
reproducibly with or without a LoRA.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from kolors_course.core.progress import progress
from kolors_course.core.paths import project_path

CHALLENGE_SCENES = 8
SETTING_KEYS = {"height", "width", "steps", "cfg_scale", "lora_scale"}


class StoryError(ValueError):
    """A story file that cannot be used; the message says what to fix."""


@dataclass
class Scene:
    framing: str
    place: str
    action: str
    seed: int


@dataclass
class Story:
    title: str
    style: str
    character: str
    negative: str
    scenes: list
    settings: dict = field(default_factory=dict)
    source: str = ""
    trigger: str = ""      # the LoRA's trigger word(s), first in every prompt (see ``with_trigger``)

    def prompt(self, i: int) -> str:
        """The course's template: style, framing, character, place, action; the trigger word first."""
        s = self.scenes[i]
        sep = "，" if _is_chinese(self.style + self.character) else ", "
        return sep.join(p.strip() for p in (self.trigger, self.style, s.framing, self.character, s.place, s.action)
                        if p.strip())

    def with_trigger(self, words) -> "Story":
        """A copy whose prompts start with the LoRA's trigger word(s) (none: the story as written)."""
        from kolors_course.core.trigger import words as as_words

        ws = as_words(words)
        sep = "，" if _is_chinese(self.style + self.character + "".join(ws)) else ", "
        return replace(self, trigger=sep.join(ws))

    def prompts(self) -> list[str]:
        return [self.prompt(i) for i in range(len(self.scenes))]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def load_story(path: str | os.PathLike, require: int = CHALLENGE_SCENES) -> Story:
    """Read and check a story file (YAML, parsed safely)."""
    path = _story_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StoryError(f"{path.name} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise StoryError(f"{path.name} is not UTF-8 text") from None
    return parse_story(data, source=str(path), require=require)


def _story_path(path) -> Path:
    p = Path(path)
    if p.suffix not in (".yaml", ".yml"):
        p = project_path("assets/stories") / f"{path}.yaml"    # a bundled story by name
    p = project_path(p) if not p.is_absolute() else p
    if not p.is_file():
        bundled = sorted(x.stem for x in project_path("assets/stories").glob("*.yaml"))
        raise StoryError(f"story file {path} not found; bundled stories: {', '.join(bundled)}")
    return p


def parse_story(data, source: str = "", require: int = CHALLENGE_SCENES) -> Story:
    where = Path(source).name or "the story"
    if not isinstance(data, dict):
        raise StoryError(f"{where}: expected a mapping with title, style, character, negative, scenes")
    problems = []
    for key in ("title", "style", "character"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            problems.append(f"'{key}' is missing or empty")
    negative = data.get("negative", "")
    if not isinstance(negative, str):
        problems.append("'negative' must be text")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        problems.append("'settings' must be a mapping")
        settings = {}
    unknown = sorted(set(settings) - SETTING_KEYS)
    if unknown:
        problems.append(f"unknown settings {unknown} (known: {sorted(SETTING_KEYS)})")
    for k in ("height", "width"):
        if k in settings and (not isinstance(settings[k], int) or settings[k] % 64 or settings[k] <= 0):
            problems.append(f"settings.{k}={settings[k]!r}: use a positive multiple of 64")
    if "lora_scale" in settings and not (isinstance(settings["lora_scale"], (int, float))
                                         and settings["lora_scale"] >= 0):
        problems.append("settings.lora_scale must be a number >= 0")
    raw = data.get("scenes")
    scenes = []
    if not isinstance(raw, list) or not raw:
        problems.append("'scenes' must be a list of scenes")
        raw = []
    seeds = set()
    for n, sc in enumerate(raw, 1):
        if not isinstance(sc, dict):
            problems.append(f"scene {n} must be a mapping with framing, place, action, seed")
            continue
        missing = [k for k in ("framing", "place", "action") if not str(sc.get(k, "")).strip()]
        if missing:
            problems.append(f"scene {n} lacks {', '.join(missing)}")
        seed = sc.get("seed")
        if not isinstance(seed, int) or seed < 0:
            problems.append(f"scene {n}: seed must be a non-negative integer (judges reproduce images "
                            "from it)")
        elif seed in seeds:
            problems.append(f"scene {n}: seed {seed} is used twice")
        seeds.add(seed)
        scenes.append(Scene(str(sc.get("framing", "")), str(sc.get("place", "")), str(sc.get("action", "")),
                            seed if isinstance(seed, int) else 0))
    if raw and len(raw) < require:
        problems.append(f"it has {len(raw)} scene(s); the challenge asks for at least {require} "
                        "images forming one story")
    if problems:
        raise StoryError(f"{where}: " + "; ".join(problems))
    return Story(data["title"].strip(), data["style"].strip(), data["character"].strip(),
                 (negative or "").strip(), scenes, dict(settings), source)


def outside_the_tiny_world(story: Story, profile) -> str | None:
    """A note when ``profile``'s models are the tiny world's and the story's character names none of
    its shapes: its pictures will show nothing of the story (None: nothing to say)."""
    if profile.model_source != "tiny":
        return None
    from kolors_course.world.scenes import SHAPES

    if any(shape in story.character for shape in SHAPES):
        return None
    return (f"note: {story.title!r} is written for a real model: the tiny models know only the tiny world's "
            f"words (shapes {'/'.join(SHAPES)}, colours, {{颜色}}背景), so its pictures will be near-blank. "
            "On tiny use the profile's story (little_star) or write one in those words.")


def generation_settings(story: Story, profile) -> dict:
    """The story's settings where the profile takes them (``story_sizes``: kolors); elsewhere
    (tiny, the CPU rehearsal) the profile's sizes and steps, with the story's cfg and LoRA scale.
    Prints a note when the story's words are outside the tiny world's (``outside_the_tiny_world``)."""
    note = outside_the_tiny_world(story, profile)
    if note:
        print(note)
    s = {"height": profile.height, "width": profile.width, "steps": profile.steps,
         "cfg_scale": profile.cfg_scale, "lora_scale": 1.0}
    if not profile.story_sizes:
        s.update({k: v for k, v in story.settings.items() if k in ("cfg_scale", "lora_scale")})
    else:
        s.update(story.settings)
    return s


def scene_settings(story: Story, settings: dict, i: int = 0) -> dict:
    """Everything ``kc.generate`` needs to draw scene ``i`` (0-based) as ``generate_story`` does:
    prompt, negative prompt, seed, cfg, steps and size."""
    return dict(prompt=story.prompt(i), negative_prompt=story.negative, seed=story.scenes[i].seed,
                cfg_scale=settings["cfg_scale"], steps=settings["steps"], height=settings["height"],
                width=settings["width"])


def generate_story(pipe, story: Story, settings: dict, folder: str | os.PathLike) -> list[dict]:
    """Generate every scene; images saved as ``folder/scene_01.png ...`` (a relative folder is
    under the project root, as everywhere in the kit); returns one record each."""
    from kolors_course.generation.text2image import generate

    folder = project_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in progress(range(len(story.scenes)), desc=f"story: {story.title}"):
        scene = story.scenes[i]
        image = generate(pipe, story.prompt(i), negative_prompt=story.negative, seed=scene.seed,
                         cfg_scale=settings["cfg_scale"], steps=settings["steps"],
                         height=settings["height"], width=settings["width"])
        path = folder / f"scene_{i + 1:02d}.png"
        image.save(path)
        records.append({"index": i + 1, "prompt": story.prompt(i), "negative_prompt": story.negative,
                        "seed": scene.seed, "cfg_scale": settings["cfg_scale"], "steps": settings["steps"],
                        "height": settings["height"], "width": settings["width"],
                        "framing": scene.framing, "place": scene.place, "action": scene.action,
                        "file": path.name, "image": image})
    return records
