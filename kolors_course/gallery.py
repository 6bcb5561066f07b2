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
    from .viz import show_grid

    items = [(f"{r['index']} - seed {r['seed']}", r["image"]) for r in records]
    return show_grid(items, cols=4, title=title, save_to=path, cell_inches=2.6)


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_gallery(records: list, story, scores, lora_info: dict, path: Path, profile_name: str) -> Path:
    """One HTML file with every image embedded: it opens from disk, offline, anywhere."""
    e = html.escape
    cards = []
    for r, s in zip(records, scores.per_image):
        cards.append(f"""
  <figure class="scene">
    <img src="{_data_uri(r['image'])}" alt="scene {r['index']}" width="{r['width']}" height="{r['height']}">
    <figcaption>
      <b>{r['index']}. {e(r['framing'])} · {e(r['place'])}</b><br>{e(r['action'])}
      <dl><dt>prompt</dt><dd>{e(r['prompt'])}</dd>
      <dt>seed</dt><dd>{r['seed']}</dd><dt>aesthetic score</dt><dd>{s:.3f}</dd></dl>
    </figcaption>
  </figure>""")
    lora_rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in lora_info.items())
    note = "" if scores.meaningful else (
        "<p class='warn'>Tiny profile: random-weight models and an untrained scorer; the pictures and "
        "scores only show that every step ran.</p>")
    page = f"""<!DOCTYPE html>
<html lang="zh"><head><meta charset="utf-8">
<title>{e(story.title)}</title>
<style>
 body {{ font-family: sans-serif; margin: 2em; background: #faf8f3; color: #222; }}
 .grid {{ display: grid; grid-template-columns: repeat(4, 1fr); gap: 1em; }}
 .scene img {{ width: 100%; height: auto; image-rendering: auto; border-radius: 4px; }}
 figcaption {{ font-size: 0.85em; }} dt {{ font-weight: bold; }} dd {{ margin: 0 0 0.3em 0; }}
 .warn {{ color: #a33; }} table {{ border-collapse: collapse; }} th, td {{ padding: 2px 8px; text-align: left; }}
</style></head>
<body data-images-expected="{len(records)}">
<h1>{e(story.title)}</h1>
<p><b>style</b>: {e(story.style)}<br><b>character</b>: {e(story.character)}<br>
<b>negative prompt</b>: {e(story.negative)}<br><b>profile</b>: {e(profile_name)}</p>
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


def write_bundle(dest_parent: Path, team: str, story, records: list, scores, lora_files: dict,
                 lora_meta: dict, settings: dict, grid: Path, gallery: Path) -> Path:
    """Everything the challenge asks for, in one folder, with a manifest of hashes and versions."""
    from .envinfo import environment_report

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
    (tmp / "prompts.json").write_text(json.dumps({"story": story.to_dict(), "images": prompts},
                                                 indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp / "scores.json").write_text(json.dumps(scores.to_dict(), indent=2), encoding="utf-8")
    (tmp / "model_card.md").write_text(model_card(team, story, lora_meta, settings, scores), encoding="utf-8")
    env = environment_report(str(dest_parent))
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "team": team, "story": story.title,
        "python": env["python"], "torch": env.get("torch"), "packages": env["packages"],
        "files_sha256": files}, indent=2, ensure_ascii=False), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def model_card(team: str, story, meta: dict, settings: dict, scores) -> str:
    trig = ", ".join(json.loads(meta.get("trigger_words", "[]"))) or "(none)"
    training = json.loads(meta.get("training", "{}") or "{}")
    lines = [f"# {team} - Kolors LoRA", "",
             f"A LoRA for Kwai-Kolors (可图), base model `{meta.get('base_model', '?')}`.", "",
             f"- trigger words: {trig}",
             f"- rank {meta.get('lora_rank')}, alpha {meta.get('lora_alpha')} "
             f"(applied as alpha/rank = {meta.get('lora_scale')})",
             f"- recommended LoRA scale: {settings['lora_scale']} (1.0 = as trained)",
             f"- story: {story.title}; 8 images, {settings['width']}x{settings['height']}, "
             f"{settings['steps']} steps, cfg_scale {settings['cfg_scale']}; seeds and prompts in prompts.json",
             f"- mean aesthetic score: {scores.mean:.3f}" + ("" if scores.meaningful else " (tiny profile: meaningless)"),
             "", "## Files", "",
             "- `lora.safetensors`: DiffSynth layout (`ModelManager.load_lora(path, lora_alpha=scale*alpha/rank)`)",
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
    path.write_text(f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Class run</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 10px;text-align:left}}</style></head>
<body><h1>Class run: {len(entries)} parameter sets</h1>
<table><tr><th>set</th><th>status</th><th>gallery</th><th>detail</th></tr>{''.join(rows)}</table>
</body></html>""", encoding="utf-8")
    return path
