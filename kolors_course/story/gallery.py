"""Sharing a story: the 2x4 grid, a self-contained HTML gallery, the submission
bundle, and an index page over several galleries."""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import shutil
import time
from pathlib import Path



def story_grid(records: list, path: Path, title: str = ""):
    """The 8 images as a 2x4 grid with scene numbers and seeds (ASCII labels render everywhere)."""
    from kolors_course.core.images import show_grid

    items = [(f"{r['index']} - seed {r['seed']}", r["image"]) for r in records]
    return show_grid(items, cols=4, title=title, save_to=path, cell_inches=2.6)


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


#: the page's fonts: CJK families first (Noto/Source Han on Linux, PingFang/Hiragino on
#: macOS, YaHei on Windows, WenQuanYi on older Linux), then the generic family.  Without a
#: CJK-capable font in the list or on the machine, every Chinese character is a box.
CJK_FONT_STACK = ('"Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "PingFang SC", '
                  '"Hiragino Sans GB", "Microsoft YaHei", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", '
                  'system-ui, sans-serif')


def _no_lora(lora_info: dict) -> bool:
    return str(lora_info.get("file", "")).startswith("none")


def _settings_list(r: dict, lora_scale) -> str:
    """One image's settings: what a learner needs to make it again."""
    e = html.escape
    scale = "none (base model)" if lora_scale is None else f"{lora_scale:g}" if isinstance(
        lora_scale, (int, float)) else str(lora_scale)
    items = [("seed", r["seed"]), ("steps", r.get("steps", "?")), ("cfg", r.get("cfg_scale", "?")),
             ("LoRA scale", scale)]
    return ('<dl class="settings">' +
            "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in items) + "</dl>")


def _lora_label(lora_scale) -> str:
    if lora_scale is None:
        return "base model"
    return f"with LoRA ×{lora_scale:g}" if isinstance(lora_scale, (int, float)) else "with LoRA"


def _image_figure(r: dict, label: str, lora_scale, css: str) -> str:
    e = html.escape
    return f"""
      <figure class="{css}">
        <figcaption class="label">{e(label)}</figcaption>
        <img src="{_data_uri(r['image'])}" alt="scene {r['index']}, {e(label)}" width="{r['width']}" height="{r['height']}">
        {_settings_list(r, lora_scale)}
      </figure>"""


def lora_info(lora_path, lora_meta: dict, scale: float) -> dict:
    """What the gallery says about the LoRA: its file (or that there is none), scale, rank, alpha
    and base model."""
    from kolors_course.core.paths import relative_to_root

    has = bool(lora_meta)
    return {"file": relative_to_root(lora_path) if has else "none (base model)", "scale": scale,
            **{k: lora_meta.get(k) for k in ("lora_rank", "lora_alpha", "base_model")}}


def write_gallery(records: list, story, scores, lora_info: dict, path: Path, profile_name: str,
                  base_records: list | None = None, lora_scale=None) -> Path:
    """One HTML file with every image embedded: it opens from disk, offline, anywhere.

    ``base_records``: the same scenes from the base model (same seeds); when given,
    each scene shows the base image and the LoRA image side by side.  Every image
    lists its seed, steps, cfg and LoRA scale.  ``lora_scale`` defaults to
    ``lora_info["scale"]`` (none when ``lora_info["file"]`` says there is no LoRA).
    """
    e = html.escape
    if lora_scale is None and not _no_lora(lora_info):
        lora_scale = lora_info.get("scale")
    if base_records is not None and len(base_records) != len(records):
        raise ValueError(f"{len(base_records)} base images for {len(records)} LoRA images: "
                         "pass the same scenes for both")
    pairs = base_records is not None
    cards = []
    for i, (r, s) in enumerate(zip(records, scores.per_image)):
        if pairs:
            images = (_image_figure(base_records[i], "base model", None, "variant base") +
                      _image_figure(r, _lora_label(lora_scale), lora_scale, "variant lora"))
        else:
            images = _image_figure(r, _lora_label(lora_scale), lora_scale, "variant")
        cards.append(f"""
  <section class="scene">
    <div class="images">{images}
    </div>
    <div class="caption">
      <b>{r['index']}. {e(r['framing'])} · {e(r['place'])}</b><br>{e(r['action'])}
      <dl><dt>prompt</dt><dd>{e(r['prompt'])}</dd>
      <dt>aesthetic score</dt><dd>{s:.3f}</dd></dl>
    </div>
  </section>""")
    n_images = len(records) + (len(base_records) if pairs else 0)
    lora_rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in lora_info.items())
    note = "" if scores.meaningful else (
        "<p class='warn'>Tiny profile: small models of Kolors' architecture (not yet trained: the pictures "
        "show that every step ran) and a stand-in scorer trained on the kit's toy world to tell clean "
        "pictures from damaged ones; the real model and the LAION predictor run on the kolors profile.</p>")
    layout = ("base model (left) and with the LoRA (right), same seeds"
              if pairs else "one image per scene")
    page = f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8">
<title>{e(story.title)}</title>
<style>
 body {{ font-family: {CJK_FONT_STACK}; margin: 2em; background: #faf8f3; color: #222; }}
 .grid {{ display: grid; grid-template-columns: repeat({2 if pairs else 4}, minmax(0, 1fr)); gap: 1.2em; }}
 .images {{ display: grid; grid-template-columns: repeat({2 if pairs else 1}, minmax(0, 1fr)); gap: 0.5em; }}
 .variant {{ margin: 0; }} .label {{ font-size: 0.8em; font-weight: bold; color: #555; }}
 .variant img {{ width: 100%; height: auto; image-rendering: auto; border-radius: 4px; display: block; }}
 .settings {{ display: grid; grid-template-columns: auto 1fr; gap: 0 0.6em; font-size: 0.75em; margin: 0.2em 0; }}
 .settings dt {{ font-weight: normal; color: #666; }} .settings dd {{ margin: 0; }}
 .caption {{ font-size: 0.85em; }} dt {{ font-weight: bold; }} dd {{ margin: 0 0 0.3em 0; }}
 .warn {{ color: #a33; }} table {{ border-collapse: collapse; }} th, td {{ padding: 2px 8px; text-align: left; }}
</style></head>
<body data-images-expected="{n_images}">
<h1>{e(story.title)}</h1>
<p><b>style</b>: {e(story.style)}<br><b>character</b>: {e(story.character)}<br>
<b>negative prompt</b>: {e(story.negative or "(none)")}<br><b>profile</b>: {e(profile_name)}<br>
<b>trigger word</b>: {e(getattr(story, "trigger", "") or "(none)")}<br>
<b>images</b>: {e(layout)}</p>
<p><b>mean aesthetic score</b>: {scores.mean:.3f} ({'valid' if scores.valid else 'below'} the challenge's bar of {scores.threshold})</p>
{note}
<div class="grid">{''.join(cards)}
</div>
<h2>LoRA</h2><table>{lora_rows}</table>
<script>
 window.addEventListener('load', function () {{
   var imgs = document.querySelectorAll('img');
   var ok = 0;
   imgs.forEach(function (im) {{ if (im.complete && im.naturalWidth > 0) ok += 1; }});
   document.body.setAttribute('data-images-loaded', String(ok));
 }});
</script>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


def team_folder_name(team: str, lora_name: str) -> str:
    """The challenge's naming: 队伍名称-可图Kolors训练-xxxxxx."""
    clean = re.sub(r"[^\w\-]+", "_", team.strip(), flags=re.UNICODE).strip("_")
    if not clean:
        raise ValueError("team_name is empty: the challenge names entries after the team")
    suffix = re.sub(r"[^\w\-]+", "_", lora_name, flags=re.UNICODE).strip("_") or "lora"
    return f"{clean}-可图Kolors训练-{suffix}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def modelscope_repo_name(team: str, lora_name: str) -> str:
    """The repository part of the ModelScope model id: Latin letters, digits, '-', '_', '.'
    (the challenge's Chinese name goes into the model's Chinese name, ``chinese_name``)."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "-", x).strip("-._") for x in (team, "kolors-lora", lora_name)]
    return "-".join(p for p in parts if p)


def post_title(team: str, link: str) -> str:
    """The discussion post's title, in the challenge's format: 天池平台报名队伍名称+LoRA模型链接地址+作品图(8图故事)."""
    if not team.strip():
        raise ValueError("team_name is empty: the post's title starts with the team's name on Tianchi")
    return f"{team.strip()}+{link}+作品图(8图故事)"


def upload_text(bundle: Path, team: str, story, records: list, scores, lora_meta: dict, settings: dict,
                modelscope_user: str | None = None) -> str:
    """UPLOAD.md: the ModelScope upload (the SDK call, shown, never run by the kit) and the
    discussion post's title and text, ready to paste."""
    from kolors_course.core.paths import relative_to_root
    from kolors_course.core.trigger import lora_trigger_words

    name = bundle.name                                     # 队伍名称-可图Kolors训练-xxxxxx
    user = modelscope_user or "<你的魔搭用户名 / your ModelScope user name>"
    model_id = f"{user}/{modelscope_repo_name(team, name.rsplit('-', 1)[-1])}"
    link = f"https://www.modelscope.cn/models/{model_id}"
    trig = "，".join(lora_trigger_words(lora_meta)) or "(none)"
    verdict = "meets" if scores.valid else "is BELOW"
    lines = [f"# Submitting {name}", "",
             "## 1. Upload the LoRA to ModelScope (魔搭模型库)", "",
             f"The challenge asks for the model name `{name}` (队伍名称-可图Kolors训练-xxxxxx); the call below "
             "gives it as the model's Chinese name (`chinese_name`, 模型中文名称) and keeps the repository id to "
             f"Latin letters, digits, '-', '_' and '.': `{model_id}`. Create an access token at "
             "https://www.modelscope.cn/my/myaccesstoken, then run, in this folder's parent, with the "
             "token in the environment (never in a file you share):", "",
             "```python",
             "import os",
             "from modelscope.hub.api import HubApi",
             "",
             "api = HubApi()",
             'api.login(os.environ["MODELSCOPE_API_TOKEN"])',
             "api.push_model(",
             f"    model_id={model_id!r},",
             f"    model_dir={name!r},",
             f"    chinese_name={name!r},",
             "    visibility=5,                     # 5: public, so the judges can download it (1: private)",
             '    ignore_patterns=["UPLOAD.md"],',
             f"    commit_message={('LoRA and 8-image story: ' + story.title)!r},",
             ")",
             "```", "",
             f"The kit only shows this call; it never uploads. (Folder here: `{relative_to_root(bundle)}`.) "
             f"The model page is then {link}", "",
             "## 2. The post in the competition's discussion area (天池论坛)", "",
             "Title (标题):", "", "```", post_title(team, link), "```", "",
             "Text (正文):", "", "```",
             f"队伍 (team): {team.strip()}",
             f"LoRA 模型 (model): {link}",
             f"触发词 (trigger word): {trig}",
             f"故事 (story): {story.title}",
             f"设置 (settings): {settings['width']}x{settings['height']}, {settings['steps']} steps, "
             f"cfg_scale {settings['cfg_scale']}, LoRA scale {settings['lora_scale']}",
             f"负面提示词 (negative prompt): {story.negative or '无 (none)'}",
             f"美学评分 (aesthetic score): {scores.mean:.3f} ({verdict} the bar of {scores.threshold:g})"
             + ("" if scores.meaningful else " [tiny profile: stand-in scorer]"),
             "", "8 张图的提示词 (the 8 prompts):"]
    lines += [f"{r['index']}. (seed {r['seed']}) {r['prompt']}" for r in records]
    lines += ["```", "",
              "Attach `grid.png` and the eight images in `images/` (作品图); `prompts.json` has every "
              "setting needed to make each image again."]
    if not scores.valid:
        lines += ["", f"**Warning**: the mean aesthetic score {scores.mean:.3f} is below {scores.threshold:g}: "
                  "an entry under the bar is not judged."]
    return "\n".join(lines) + "\n"


def write_bundle(dest_parent: Path, team: str, story, records: list, scores, lora_files: dict,
                 lora_meta: dict, settings: dict, grid: Path, gallery: Path,
                 modelscope_user: str | None = None) -> Path:
    """Everything the challenge asks for, in one folder, with a manifest of hashes and versions,
    and ``UPLOAD.md``: the ModelScope upload call and the discussion post, ready to paste.

    A bundle already there is moved to ``<name>.previous`` (one generation kept), not deleted."""
    from kolors_course.setup.envinfo import environment_report

    name = team_folder_name(team, Path(story.source).stem or "story")
    final = dest_parent / name
    tmp = dest_parent / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for r in records:
        r["image"].save(tmp / "images" / f"{r['index']:02d}.png")
    for key, src in lora_files.items():
        shutil.copyfile(src, tmp / Path(src).name)
    shutil.copyfile(grid, tmp / "grid.png")
    shutil.copyfile(gallery, tmp / "gallery.html")
    prompts = [{k: v for k, v in r.items() if k != "image"} | {"file": f"images/{r['index']:02d}.png",
                                                              "lora_scale": settings["lora_scale"]}
               for r in records]
    (tmp / "prompts.json").write_text(json.dumps({"story": story.to_dict(), "trigger_word": story.trigger,
                                                  "images": prompts},
                                                 indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp / "scores.json").write_text(json.dumps(scores.to_dict(), indent=2), encoding="utf-8")
    card = model_card(team, story, lora_meta, settings, scores)
    (tmp / "model_card.md").write_text(card, encoding="utf-8")
    # what ModelScope shows on the model page, and the configuration file push_model looks for
    (tmp / "README.md").write_text("---\ntasks:\n- text-to-image-synthesis\n---\n\n" + card, encoding="utf-8")
    (tmp / "configuration.json").write_text(json.dumps({"framework": "pytorch", "task": "text-to-image-synthesis"},
                                                       indent=2), encoding="utf-8")
    (tmp / "UPLOAD.md").write_text(upload_text(final, team, story, records, scores, lora_meta, settings,
                                               modelscope_user), encoding="utf-8")
    # scene 1 as ComfyUI workflows (with and without a ControlNet), checked against the nodes'
    # own definitions before they are written; hashed into the manifest with the rest
    from kolors_course.comfyui.workflows import write_workflows

    write_workflows(tmp, story, records, settings, settings["lora_scale"])
    env = environment_report(str(dest_parent))
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "team": team, "story": story.title,
        "python": env["python"], "torch": env.get("torch"), "packages": env["packages"],
        "files_sha256": files}, indent=2, ensure_ascii=False), encoding="utf-8")
    if final.exists():
        # a bundle made before (say, at another lora_scale) is what a team may have uploaded:
        # kept one generation back rather than deleted
        previous = dest_parent / f"{name}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(tmp, final)
    return final


def model_card(team: str, story, meta: dict, settings: dict, scores) -> str:
    from kolors_course.core.trigger import lora_trigger_words

    words = lora_trigger_words(meta)
    trig = ", ".join(words) or "(none)"
    training = json.loads(meta.get("training", "{}") or "{}")
    lines = [f"# {team} - Kolors LoRA", "",
             f"A LoRA for Kwai-Kolors (可图), base model `{meta.get('base_model', '?')}`.", "",
             f"- trigger words: {trig}" + (" (put them first in the prompt; the story's prompts do)" if words else ""),
             f"- rank {meta.get('lora_rank')}, alpha {meta.get('lora_alpha')} "
             f"(applied as alpha/rank = {meta.get('lora_scale')})",
             f"- recommended LoRA scale: {settings['lora_scale']} (1.0 = as trained)",
             f"- story: {story.title}; 8 images, {settings['width']}x{settings['height']}, "
             f"{settings['steps']} steps, cfg_scale {settings['cfg_scale']}; seeds and prompts in prompts.json",
             f"- prompt of scene 1: {story.prompt(0)}",
             f"- mean aesthetic score: {scores.mean:.3f} ({'meets' if scores.valid else 'below'} the bar of "
             f"{scores.threshold:g})" + ("" if scores.meaningful else " (tiny profile: stand-in scorer)"),
             "", "## Files", "",
             "- `lora.safetensors`: DiffSynth layout (`ModelManager.load_lora(path, lora_alpha=scale*alpha/rank)`)"
             + (f"; it holds {meta['kolors_course.wide_convolutions']} 3x3 convolution layers (a LoCon), which "
                "DiffSynth 1.1.9's `load_lora` cannot fuse: load it with the kit "
                "(`kc.load_pipeline(profile, lora=path)`) or use the kohya file"
                if meta.get("kolors_course.wide_convolutions") else ""),
             "- `lora_kohya.safetensors`: kohya/SDXL layout for ComfyUI (`LoraLoaderModelOnly` after the Kolors-MZ "
             "UNet loader) and diffusers", "", "## Training settings", ""]
    lines += [f"- {k}: {v}" for k, v in training.items()]
    return "\n".join(lines) + "\n"


def write_index(entries: list[dict], path: Path) -> Path:
    """A page linking every set's gallery (relative links) with its status."""
    e = html.escape
    rows = []
    for ent in entries:
        link = (f"<a href='{e(os.path.relpath(ent['gallery'], path.parent))}'>gallery</a>"
                if ent.get("gallery") else "no gallery")
        rows.append(f"<tr><td>{e(ent['name'])}</td><td>{e(ent['status'])}</td><td>{link}</td>"
                    f"<td>{e(ent.get('detail', ''))}</td></tr>")
    path.write_text(f"""<!DOCTYPE html><html lang="zh-CN"><head><meta charset="utf-8"><title>Class run</title>
<style>body{{font-family:{CJK_FONT_STACK};margin:2em}} td,th{{padding:4px 10px;text-align:left}}</style></head>
<body><h1>Class run: {len(entries)} parameter sets</h1>
<table><tr><th>set</th><th>status</th><th>gallery</th><th>detail</th></tr>{''.join(rows)}</table>
</body></html>""", encoding="utf-8")
    return path
