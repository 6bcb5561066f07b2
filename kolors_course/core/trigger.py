"""One trigger word (触发词), from the data set to the story.

A LoRA learns to tie its style to a word that stands in every training caption.
The word is chosen once and then travels with the files:

1. notebook 02 puts it first in every caption and records it in the data set's
   ``dataset.json`` (``trigger_word``);
2. notebook 03 reads it back from there, trains with
   ``TrainConfig(trigger_words=(word,))`` (validation prompts start with it) and
   writes it into both LoRA files' metadata and the model card;
3. notebook 04 reads it from the LoRA file and puts it first in every story prompt.

Where nothing says otherwise, the profile's ``trigger_word`` is the default.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kolors_course.core.paths import project_path, relative_to_root


def _sep(text: str) -> str:
    return "，" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else ", "


def words(value) -> list[str]:
    """Trigger words as a clean list, from None, a word, a list, or LoRA metadata's JSON text."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            return [text] if text else []
    return [str(w).strip() for w in value if str(w).strip()]


def with_trigger(prompt: str, trigger) -> str:
    """``prompt`` with the trigger word(s) first; a word already in the prompt is not added twice."""
    missing = [w for w in words(trigger) if w not in prompt]
    if not missing:
        return prompt
    sep = _sep("".join(missing) + prompt)
    return sep.join(missing + ([prompt] if prompt.strip() else []))


def without_trigger(prompt: str, trigger) -> str:
    """``prompt`` with the trigger word(s) taken out, with the separator that joined each to the
    rest: the inverse of ``with_trigger`` ("几何风，一个红色的圆形" -> "一个红色的圆形")."""
    import re

    for w in words(trigger):
        # a Latin word only as a whole word ("a" is not taken out of "cat"); Chinese has no spaces
        edge = (r"(?<![A-Za-z0-9_])", r"(?![A-Za-z0-9_])") if w.isascii() else ("", "")
        prompt = re.sub(edge[0] + re.escape(w) + edge[1] + r"[\s，,、;；。:：]*", "", prompt)
    return re.sub(r"[\s，,、;；。:：]+$", "", prompt).strip()


def recorded_trigger_word(dataset_dir: str | os.PathLike) -> str | None:
    """The trigger word a data set built by notebook 02 was captioned with (None: not recorded)."""
    from kolors_course.data.training_set import MARKER

    folder = project_path(dataset_dir)
    marker = folder / MARKER
    if not marker.exists() and folder.name == "train":
        marker = folder.parent / MARKER
    if not marker.exists():
        return None
    info = json.loads(marker.read_text(encoding="utf-8"))
    if "trigger_word" in info:
        return info["trigger_word"]
    return (info.get("captions") or {}).get("trigger")


def choose_trigger_word(profile, trigger_word: str | None = None, dataset_dir=None,
                        verbose: bool = True) -> str:
    """The trigger word to use: ``trigger_word`` if given, else the one recorded with
    ``dataset_dir``, else the profile's.  Says which when ``verbose``."""
    if trigger_word is not None:
        word, why = trigger_word.strip(), "set in this notebook"
    else:
        recorded = recorded_trigger_word(dataset_dir) if dataset_dir is not None else None
        if recorded is not None:
            word = recorded
            why = f"recorded with the data set in {relative_to_root(Path(project_path(dataset_dir)))}"
        else:
            word, why = profile.trigger_word, f"the {profile.name} profile's default"
    if verbose:
        print(f"trigger word: {word!r} ({why})" if word else f"no trigger word ({why})")
    return word


def lora_trigger_words(meta: dict) -> list[str]:
    """The trigger words a kit LoRA file records in its metadata."""
    return words(meta.get("trigger_words") or [])


def story_trigger_words(lora_meta: dict | None, trigger_word: str | None = None,
                        verbose: bool = True) -> list[str]:
    """What a story's prompts start with: ``trigger_word`` if given, else the LoRA file's
    trigger words; nothing without a LoRA (``lora_meta`` None or empty)."""
    if not lora_meta:
        if verbose and trigger_word:
            print(f"no LoRA: the trigger word {trigger_word!r} would call up nothing, so the prompts go without it")
        return []
    if trigger_word is not None:
        chosen, why = words(trigger_word), "set in this notebook"
    else:
        chosen, why = lora_trigger_words(lora_meta), "recorded in the LoRA file"
    if verbose:
        if chosen:
            print(f"trigger word(s) {chosen} ({why}): first in every prompt")
        else:
            print(("trigger_word is empty" if trigger_word is not None else "the LoRA records no trigger word")
                  + ": the prompts stay as the story file writes them")
    return chosen
