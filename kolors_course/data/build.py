"""Building a LoRA training set: source -> checked images -> captions -> data-juicer
filters -> ``train/`` folder with ``metadata.csv``, plus a report.

The result is built in a new folder beside the target and moved into place only
when complete.  The source images are only read, never changed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import kolors_course.data.clean as data_clean
import kolors_course.data.recipe as data_filter
import kolors_course.data.sources as data_sources
from kolors_course.core.progress import progress
from kolors_course.data.recipe import FilterError, Recipe
from kolors_course.core.paths import project_path, relative_to_root
from kolors_course.data.training_set import MARKER, DatasetError, write_train

@dataclass
class Captions:
    """How each image gets its caption.

    ``mode="source"`` keeps the source's caption and uses ``fallback`` where an
    image has none; ``mode="template"`` builds every caption from ``template``.
    Templates may use {trigger}, {caption}, {orientation} (横/竖/方构图), {color}
    (dominant colour) and {index}.  ``fallback=None`` drops uncaptioned images.
    """
    mode: str = "source"
    trigger: str = ""
    template: str = "{trigger}，{caption}"
    fallback: str | None = "{trigger}，{orientation}，{color}"

    def make(self, item, facts: dict, index: int) -> str | None:
        if self.mode not in ("source", "template"):
            raise ValueError("captions mode must be 'source' or 'template'")
        fields = dict(facts, trigger=self.trigger, caption=item.caption or "", index=index)
        if self.mode == "template" or item.caption:
            text = self.template.format(**fields)
        elif self.fallback is not None:
            text = self.fallback.format(**fields)
        else:
            return None
        return _tidy(text)


def _tidy(text: str) -> str:
    parts = [p.strip() for p in text.replace(",", "，").split("，")]
    return "，".join(p for p in parts if p)


@dataclass
class BuildResult:
    folder: Path
    n_in: int                                        # image files found (not metadata rows)
    n_out: int
    counts: list = field(default_factory=list)       # [(stage, left)]
    dropped: list = field(default_factory=list)      # [Dropped as dict]
    report: dict = field(default_factory=dict)

    @property
    def train_dir(self) -> Path:
        return self.folder / "train"

    def summary(self) -> str:
        lines = [f"{self.n_in} images in, {self.n_out} kept -> {relative_to_root(self.train_dir)}"]
        inp = self.report.get("input") or {}
        if inp.get("metadata_file"):
            lines.append(f"  {inp['metadata_rows']} metadata rows in {inp['metadata_file']}: "
                         f"{inp['rows_refused']} refused (outside the folder), "
                         f"{inp['rows_missing_file']} naming a missing file; "
                         f"{inp['unlisted_images']} unlisted images ({inp['unlisted_decision']})")
        for stage, left in self.counts:
            lines.append(f"  after {stage:<26} {left:>5}")
        by_stage = data_clean.dropped_by_stage(self.dropped)
        if by_stage:
            lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in by_stage.items()))
        return "\n".join(lines)


def resolve_source(source: str, workdir: Path, limit: int | None, seed: int, base: int) -> Path:
    """A local folder for any source: the folder itself, a synthetic set, or a ModelScope download."""
    if source == "synthetic":
        return data_sources.make_synthetic_source(workdir / "synthetic_source", n=limit or 24,
                                                  seed=seed, base=base)
    p = project_path(source)
    if p.is_dir():
        return p
    if "/" in source and not source.startswith((".", "/")) and not p.exists():
        cache = project_path("cache") / "datasets"
        dest = cache / source.replace("/", "__")
        if (dest / "metadata.jsonl").exists():
            return dest
        data_sources.download_modelscope(source, dest, limit=limit, cache_dir=cache / "modelscope")
        return dest
    raise DatasetError(f"source {source!r} is neither a folder, 'synthetic', nor a ModelScope id "
                       "such as 'AI-ModelScope/lowres_anime'")


def _note_repeated_template_captions(items) -> None:
    """Says so when most captions made from the template are one and the same text: a template
    names only orientation and colour, and identical captions tell a LoRA nothing about what
    differs between the pictures (the original course's one caption for every image)."""
    from collections import Counter

    made = [it.caption for it in items if "caption from template" in it.notes]
    if len(made) < 3:
        return
    text, n = Counter(made).most_common(1)[0]
    if n >= 3 and n * 2 > len(made):
        print(f"note: {n} of the {len(made)} captions made from the template are the same text ({text!r}): "
              "the words cannot tell those pictures apart. Write a caption for each (a .txt beside the "
              "image, or metadata.csv), or edit them in notebook 02's caption editor.")


def build_training_set(source: str, out: str | os.PathLike, recipe: Recipe | None = None,
                       captions: Captions | None = None, limit: int | None = None, seed: int = 0,
                       synthetic_size: int = 64, verbose: bool = False) -> BuildResult:
    """Build ``out/train/`` (RGB JPEGs + ``metadata.csv``) and ``out/report/`` from ``source``."""
    recipe = recipe or Recipe()
    captions = captions or Captions()
    recipe.validate()
    if captions.mode not in ("source", "template"):
        raise ValueError("captions mode must be 'source' or 'template'")
    out = project_path(out)
    if out.exists() and not (out / MARKER).exists():
        raise DatasetError(f"{out} exists and was not made by this kit: choose another `out` "
                           "(nothing was changed)")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        src_folder = resolve_source(source, tmp, limit, seed, synthetic_size)
        if src_folder.resolve() == out.resolve() or out.resolve() in src_folder.resolve().parents:
            raise DatasetError("`out` must not contain the source images")
        # the kit's own output must not be read back as source images when `out` lies inside it
        scan = data_sources.scan_folder(src_folder, exclude=(out, tmp))
        for note in scan.notes:
            print(f"note: {note}")
        items = scan.items
        if limit is not None and source != "synthetic":
            items = items[:limit]
        inp = _input_facts(scan, items, captions)
        if inp["unlisted_images"]:
            n = inp["unlisted_images"]
            print(f"note: {n} image{'s' * (n != 1)} in {src_folder} not listed in "
                  f"{inp['metadata_file']}: {inp['unlisted_decision']} (counted in report.json)")
        if not items:
            raise DatasetError(f"no images found in {src_folder} (extensions: "
                               f"{', '.join(sorted(data_sources.IMAGE_EXTS))})")
        staging = tmp / "staging"
        kept, dropped = data_clean.normalise(items, staging, progress=progress)
        counts = [("reading and checking", len(kept))]
        # captions
        captioned = []
        unlisted = set(scan.unlisted)
        for i, it in enumerate(kept):
            text = captions.make(it, it.facts or {}, i)
            if text is None:
                why = (f"{data_sources.UNLISTED_NOTE} (and Captions(fallback=None) drops uncaptioned images)"
                       if it.id in unlisted else "no caption, and no fallback template")
                dropped.append(data_clean.Dropped(it.id, it.source, "caption", why))
                continue
            if not it.caption:
                it.notes.append("caption from template")
            it.caption = text
            captioned.append(it)
        kept = captioned
        _note_repeated_template_captions(kept)
        counts.append(("captions", len(kept)))
        if not kept:
            raise DatasetError(_nothing_left("before filtering", dropped))
        # data-juicer
        data_filter.write_dj_input(kept, tmp / "dj_input.jsonl", tmp)
        data_filter.write_recipe_yaml(recipe, tmp, len(kept))
        result = data_filter.run_recipe(tmp, recipe, len(kept), verbose=verbose)
        by_id = {it.id: it for it in kept}
        left = len(kept)
        for op, rows in result["dropped"].items():
            for rid, stats in rows:
                dropped.append(data_clean.Dropped(rid, by_id[rid].source, op, _reason(op, stats, recipe)))
            left -= len(rows)
            counts.append((op, left))
        final = [by_id[i] for i in by_id if i in result["kept"]]
        if not final:
            raise DatasetError(_nothing_left("after the data-juicer filters", dropped, recipe))
        write_train(final, tmp / "train")
        n_in = inp["image_files"]
        res = BuildResult(out, n_in, len(final), counts, [asdict(d) for d in dropped])
        from kolors_course.data.report import write_report
        # the report draws dropped images from the paths checked when the folder was read
        # (None for a refused one), never from a name the metadata gave
        res.report = write_report(tmp, items_before=kept, items_after=final, dropped=dropped,
                                  counts=counts, sources={it.id: it.path for it in items}, inputs=inp)
        (tmp / MARKER).write_text(json.dumps({
            "source": source, "recipe": asdict(recipe), "captions": asdict(captions),
            "trigger_word": captions.trigger,      # notebook 03 trains with it (kolors_course.core.trigger)
            "limit": limit, "seed": seed, "n_in": n_in, "n_rows": inp["metadata_rows"], "n_out": len(final),
            "counts": counts, "seconds": round(time.perf_counter() - t0, 1),
        }, indent=2, ensure_ascii=False), encoding="utf-8")
        _swap_into_place(tmp, out)
        res.report = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
        return res
    except FilterError as exc:
        raise DatasetError(str(exc)) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _input_facts(scan, items, captions: Captions) -> dict:
    """What was read, for report.json: metadata rows and image files counted apart."""
    ids = set(scan.unlisted)
    # counted from the items used (after `limit`), one per image name the metadata gives
    listed = [it for it in items if it.id not in ids] if scan.metadata_file else []
    unlisted = [it for it in items if it.id in ids]
    if captions.mode == "template":
        decision = "kept; captioned from the template like every image"
    elif captions.fallback is not None:
        decision = "kept with the fallback template caption"
    else:
        decision = "dropped: Captions(fallback=None) drops uncaptioned images"
    return {
        "folder": str(scan.folder),
        "metadata_file": scan.metadata_file,
        "ignored_metadata": list(scan.ignored_metadata),
        "metadata_rows": len(listed) if scan.metadata_file else 0,
        "rows_refused": sum(1 for it in listed if it.path is None),
        "rows_missing_file": sum(1 for it in listed if it.path is not None and not it.path.is_file()),
        "image_files": sum(1 for it in items if it.path is not None and it.path.is_file()),
        "unlisted_images": len(unlisted),
        "unlisted_decision": decision if scan.metadata_file else "no metadata file: every image is read",
        "notes": list(scan.notes),
    }


def _reason(op: str, stats: dict, recipe: Recipe) -> str:
    def first(key):
        v = stats.get(key)
        return v[0] if isinstance(v, list) and v else v
    if op == "image_shape_filter":
        # name the side(s) that fail: "2000x200 is smaller than 256x256" reads as if both did
        w, h = first("image_width"), first("image_height")
        sides = [f"{name} {v} px < {lo} px" for name, v, lo in (("width", w, recipe.min_width),
                                                                 ("height", h, recipe.min_height))
                 if v is not None and lo is not None and v < lo]
        return ", ".join(sides) or f"{w}x{h} px removed by image_shape_filter"
    if op == "image_aspect_ratio_filter":
        r = first("aspect_ratios")
        return f"aspect ratio {r:.2f} is outside {recipe.min_ratio}-{recipe.max_ratio}" if r else op
    if op == "image_size_filter":
        s = first("image_sizes")
        return (f"file size {s / 1024:.1f} KB is outside {recipe.min_size or 0}-{recipe.max_size or 'any'}"
                if s is not None else op)
    if op == "image_aesthetics_filter":
        return f"aesthetics score {first('image_aesthetics_scores')} is below {recipe.min_aesthetics}"
    return f"removed by {op}"


def _nothing_left(where: str, dropped, recipe: Recipe | None = None) -> str:
    by_stage = data_clean.dropped_by_stage(dropped)
    lines = [f"No image is left {where}: nothing was written, and any earlier training set is kept."]
    lines += [f"  {stage}: {n} removed (e.g. {next(d.reason for d in dropped if d.stage == stage)})"
              for stage, n in by_stage.items()]
    if recipe is not None:
        lines.append("Loosen the recipe (min_width/min_height, min_ratio/max_ratio, min_size) "
                     "or use bigger images.")
    return "\n".join(lines)


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
