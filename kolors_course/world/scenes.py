"""The synthetic world: one shape on a plain background, and what Chinese text says about it.

A ``Scene`` is a shape (circle, square, triangle, star) of one colour on a background of
another, big or small, on the left, on the right or in the middle, drawn in one of three
rendering styles (flat, gradient, striped) and optionally by one of two invented
"painters", each of which shifts the whole palette (warm or cool).  Those are the five
parts of a prompt the course teaches: subject (shape), details (colours), modifiers
(size, position), style, artist.

``render`` draws a scene with PIL (at 4x, then downscaled, for clean anti-aliased edges);
``caption`` writes one of many Chinese descriptions of it: varied phrasings and word
order, attributes left out, filler words, and words from outside the world, so that the
model learns to read the world's words wherever they are and to ignore words it does not
know (such as a LoRA trigger word).  About one caption in ten is empty, which teaches the
model the unconditional prediction that classifier-free guidance needs.

``COLOURS`` is the kit's one colour table (RGB per colour name).

The LoRA lesson needs a look the base model never saw: ``render(..., lora_style=True)``
draws the scene in pastel ("马卡龙色") colours, which never appear in ``sample_scenes``
training data.  A global colour change is what a rank-4 LoRA learns in a few dozen CPU
steps, and what the tiny VAE reproduces faithfully (thin detail, such as outlines, it loses).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np

# --- the vocabulary ------------------------------------------------------------------
#: the kit's single colour table (RGB); every other module reads colours from here
COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (220, 45, 45),
    "橙色": (245, 140, 30),
    "黄色": (240, 215, 40),
    "绿色": (50, 165, 75),
    "蓝色": (45, 95, 215),
    "紫色": (140, 70, 185),
    "白色": (245, 245, 240),
    "黑色": (30, 30, 30),
}
SHAPES = ("圆形", "正方形", "三角形", "星形")
SIZES = ("大的", "小的")
POSITIONS = ("左边", "右边", "中间")
#: rendering styles (the "style" part of a prompt); chosen so that the tiny VAE can draw them
STYLES = ("扁平", "渐变", "条纹")
#: invented painters (the "artist" part) and the palette shift each one stands for
PAINTERS: dict[str, tuple[int, int, int]] = {
    "": (0, 0, 0),
    "林一舟": (30, 8, -30),      # warm: more red, less blue
    "苏慕远": (-30, 0, 30),      # cool: less red, more blue
}
#: the look only the LoRA lesson's data set has (never in the base training data)
LORA_STYLE_WORD = "马卡龙色"
PASTEL_MIX = 0.55               # how far every colour moves towards white in that look

#: English glosses, for plots and reports
GLOSS = {"红色": "red", "橙色": "orange", "黄色": "yellow", "绿色": "green", "蓝色": "blue",
         "紫色": "purple", "白色": "white", "黑色": "black", "圆形": "circle", "正方形": "square",
         "三角形": "triangle", "星形": "star", "大的": "big", "小的": "small", "左边": "left",
         "右边": "right", "中间": "centre", "扁平": "flat", "渐变": "gradient", "条纹": "striped",
         "林一舟": "painter Lin (warm)", "苏慕远": "painter Su (cool)", "": "none"}

#: words from outside the world, mixed into captions so that unknown words are ignored
OUTSIDE_WORDS = (
    "小猫", "小狗", "城市", "阳光", "故事", "朋友", "早晨", "音乐", "森林", "河流", "咖啡", "老师",
    "学校", "花园", "汽车", "月亮", "雨天", "书本", "窗户", "微笑", "旅行", "海边", "山峰", "梦想",
    "时间", "家人", "春天", "冬天", "夜晚", "电影", "游戏", "蛋糕", "苹果", "天空", "草地", "房子",
    "小明", "李华", "王芳", "张伟", "高清", "杰作", "精美", "细节丰富", "最佳质量", "可爱",
    "丑陋", "变形", "嘈杂", "模糊", "低对比度", "扭曲的手指", "多余的手指", "安静", "快乐", "明亮",
    "photo", "style", "art", "hello", "ok", "A1", "test", "xyz", "HD", "4k", "lora", "v2",
)


def has_outside_word(text: str) -> bool:
    """Whether a caption holds one of ``OUTSIDE_WORDS`` (none is part of a world word)."""
    return any(word in text for word in OUTSIDE_WORDS)


FILLER_PREFIXES = ("一张图，画着", "一张图片，", "图片：", "简单的", "一幅画，", "画面里有", "这是",
                   "一张简单的图，", "插画，", "")
FILLER_SUFFIXES = ("", "", "", "。", "，简单", "，图片", "，简洁的画面", "，干净")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str            # the shape's colour
    background: str
    size: str = "大的"
    position: str = "中间"
    style: str = "扁平"
    painter: str = ""

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r}: choose from {SHAPES}")
        for name in (self.colour, self.background):
            if name not in COLOURS:
                raise ValueError(f"colour {name!r}: choose from {tuple(COLOURS)}")
        if self.colour == self.background:
            raise ValueError("the shape and the background must differ in colour")
        if self.size not in SIZES or self.position not in POSITIONS:
            raise ValueError(f"size {self.size!r} / position {self.position!r}: choose from {SIZES} / {POSITIONS}")
        if self.style not in STYLES or self.painter not in PAINTERS:
            raise ValueError(f"style {self.style!r} / painter {self.painter!r}: choose from {STYLES} / {tuple(PAINTERS)}")

    def as_dict(self) -> dict:
        return asdict(self)


# --- drawing -------------------------------------------------------------------------
#: geometry on a 128-pixel canvas (scaled for other sizes): radii and centres
RADIUS = {"大的": 24.0, "小的": 14.0}
CENTRE_X = {"左边": 40.0, "中间": 64.0, "右边": 88.0}
SUPERSAMPLE = 4


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The outline of a shape around (cx, cy) with nominal radius r (None: a circle)."""
    if shape == "圆形":
        return None
    if shape == "正方形":
        h = 0.875 * r                       # side 1.75 r: about a circle's area
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "三角形":                    # pointing up
        return [(cx, cy - 1.15 * r), (cx + 1.2 * r, cy + 0.85 * r), (cx - 1.2 * r, cy + 0.85 * r)]
    if shape == "星形":                      # five points, pointing up
        outer, inner = 1.25 * r, 0.55 * r
        return [(cx + (outer if k % 2 == 0 else inner) * math.sin(k * math.pi / 5),
                 cy - (outer if k % 2 == 0 else inner) * math.cos(k * math.pi / 5)) for k in range(10)]
    raise ValueError(shape)


def shift(rgb, delta) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c + d))) for c, d in zip(rgb, delta))


def pastel(rgb) -> tuple[int, int, int]:
    return tuple(int(round(c + PASTEL_MIX * (255 - c))) for c in rgb)


def _tone(rgb, amount: float) -> tuple[int, int, int]:
    """Lighter (amount > 0, towards white) or darker (amount < 0, towards black)."""
    if amount >= 0:
        return tuple(int(round(c + amount * (255 - c))) for c in rgb)
    return tuple(int(round(c * (1 + amount))) for c in rgb)


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def scene_colours(scene: Scene, lora_style: bool = False) -> tuple[tuple, tuple]:
    """(shape RGB, background RGB) as drawn: palette, then the painter's shift, then pastel."""
    fg = shift(COLOURS[scene.colour], PAINTERS[scene.painter])
    bg = shift(COLOURS[scene.background], PAINTERS[scene.painter])
    if lora_style:
        fg, bg = pastel(fg), pastel(bg)
    return fg, bg


def layout(scene: Scene, size: int, rng: random.Random) -> tuple[float, float, float]:
    """Centre and radius in pixels, with a little seeded jitter so no two pictures are alike."""
    k = size / 128.0
    r = RADIUS[scene.size] * rng.uniform(0.9, 1.1)
    cx = CENTRE_X[scene.position] + rng.uniform(-4, 4)
    cy = 64.0 + rng.uniform(-6, 6)
    return cx * k, cy * k, r * k


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int):
    """A PIL "L" mask of the shape (255 inside), anti-aliased by supersampling."""
    from PIL import Image, ImageDraw

    s = SUPERSAMPLE
    big = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(big)
    poly = shape_polygon(shape, cx * s, cy * s, r * s)
    if poly is None:
        d.ellipse((s * (cx - r), s * (cy - r), s * (cx + r), s * (cy + r)), fill=255)
    else:
        d.polygon(poly, fill=255)
    return big.resize((size, size), Image.BOX)


def _fill(scene: Scene, fg, size: int, top: float, bottom: float) -> np.ndarray:
    """The shape's fill as an HxWx3 array: flat, a vertical gradient, or horizontal stripes."""
    fill = np.empty((size, size, 3), np.float32)
    fill[:] = fg
    if scene.style == "渐变":
        # lighter at the top of the shape, darker at the bottom; the middle stays the colour
        y = np.arange(size, dtype=np.float32)
        t = np.clip((y - top) / max(bottom - top, 1.0), 0, 1)[:, None, None]     # 0 top .. 1 bottom
        light = np.array(_tone(fg, 0.45), np.float32)
        dark = np.array(_tone(fg, -0.45), np.float32)
        fg_a = np.array(fg, np.float32)
        upper = light + (fg_a - light) * (t / 0.5)
        lower = fg_a + (dark - fg_a) * ((t - 0.5) / 0.5)
        fill[:] = np.where(t < 0.5, upper, lower)
    elif scene.style == "条纹":
        # bands two latent cells high (16 px at 128): wide enough for the tiny VAE
        period = 16 * size / 128.0
        y = np.arange(size, dtype=np.float32) + 0.5
        band = ((y / period) % 1.0) >= 0.625                                      # 6 of 16 px
        other = _tone(fg, -0.5) if _luma(fg) > 90 else _tone(fg, 0.5)
        fill[band] = other
    return fill


def render(scene: Scene, size: int = 128, seed: int = 0, lora_style: bool = False):
    """Draw ``scene`` as a ``size`` x ``size`` RGB PIL image (same arguments, same bytes)."""
    from PIL import Image

    rng = random.Random(f"render:{seed}")
    cx, cy, r = layout(scene, size, rng)
    fg, bg = scene_colours(scene, lora_style)
    mask = np.asarray(shape_mask(scene.shape, cx, cy, r, size), np.float32)[..., None] / 255.0
    ys = np.nonzero(mask[..., 0].max(axis=1) > 0.5)[0]
    top, bottom = (float(ys.min()), float(ys.max())) if len(ys) else (0.0, float(size))
    fill = _fill(scene, fg, size, top, bottom)
    out = np.asarray(bg, np.float32) * (1 - mask) + fill * mask
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def shape_coverage(scene: Scene, size: int = 128, seed: int = 0, cell: int = 8) -> np.ndarray:
    """The share of each ``cell`` x ``cell`` block that the shape covers in ``render(scene, size,
    seed)`` (same layout, same jitter): a (size/cell) x (size/cell) float array in [0, 1]."""
    cx, cy, r = layout(scene, size, random.Random(f"render:{seed}"))
    mask = np.asarray(shape_mask(scene.shape, cx, cy, r, size), np.float32) / 255.0
    n = size // cell
    return mask[: n * cell, : n * cell].reshape(n, cell, n, cell).mean(axis=(1, 3))


def shape_coverage_batch(scene_list, size: int, seeds):
    """N x 1 x h x w tensor: ``shape_coverage`` of each scene, rendered with its seed in ``seeds``
    (the ``cell_weights`` of the UNet's and ControlNet's shape-weighted loss)."""
    import torch

    return torch.from_numpy(np.stack([shape_coverage(s, size=size, seed=seed)
                                      for s, seed in zip(scene_list, seeds, strict=True)])).unsqueeze(1)


# --- sampling scenes -----------------------------------------------------------------
#: how often each style and painter appears (flat and "no painter" are the defaults)
STYLE_WEIGHTS = {"扁平": 0.6, "渐变": 0.2, "条纹": 0.2}
PAINTER_WEIGHTS = {"": 0.6, "林一舟": 0.2, "苏慕远": 0.2}


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(list(COLOURS), 2)
    return Scene(shape=rng.choice(SHAPES), colour=colour, background=background,
                 size=rng.choice(SIZES), position=rng.choice(POSITIONS),
                 style=rng.choices(list(STYLE_WEIGHTS), weights=list(STYLE_WEIGHTS.values()))[0],
                 painter=rng.choices(list(PAINTER_WEIGHTS), weights=list(PAINTER_WEIGHTS.values()))[0])


def sample_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` random scenes; the same ``seed`` gives the same list on every machine."""
    rng = random.Random(f"scenes:{seed}")
    return [random_scene(rng) for _ in range(n)]


# --- captions ------------------------------------------------------------------------
EMPTY_CAPTION_RATE = 0.10       # unconditional examples for classifier-free guidance
OUTSIDE_ONLY_RATE = 0.03        # captions of outside words only: also "nothing said about the world"


def _shape_phrase(s: Scene, rng: random.Random, with_colour: bool, with_size: bool) -> str:
    size = s.size if with_size else ""
    if not with_colour:
        return rng.choice(["一个", ""]) + size + s.shape
    return rng.choice([
        f"一个{size}{s.colour}的{s.shape}", f"一个{size}{s.colour}{s.shape}", f"{size}{s.colour}{s.shape}",
        f"{s.colour}的{size}{s.shape}", f"一个{s.colour}的{size}{s.shape}",
    ])


def _background_phrase(s: Scene, rng: random.Random) -> str:
    return rng.choice([f"{s.background}背景", f"背景是{s.background}", f"{s.background}的背景",
                       f"背景为{s.background}"])


def _position_phrase(s: Scene, rng: random.Random) -> str:
    if s.position == "中间":
        return rng.choice(["在中间", "位于中间", "在画面中间", "居中"])
    return rng.choice([f"在{s.position}", f"位于{s.position}", f"在画面{s.position}", f"{s.position}"])


def _style_phrase(s: Scene, rng: random.Random) -> str:
    return rng.choice([f"{s.style}风格", f"{s.style}的", f"{s.style}效果", f"{s.style}"])


def _painter_phrase(s: Scene, rng: random.Random) -> str:
    return rng.choice([f"{s.painter}风格", f"{s.painter}的作品", f"画家{s.painter}", f"{s.painter}"])


def layout_caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming only the shape and its place, ``一个圆形，在左边`` or ``在左边，星形``: what
    the UNet trains on first (``UNetConfig.layout_first_steps``), so that these two words are
    learned before the colours, which pay far more of the loss, take the UNet's attention."""
    parts = [_shape_phrase(scene, rng, with_colour=False, with_size=False), _position_phrase(scene, rng)]
    rng.shuffle(parts)
    return "，".join(parts)


#: the shape primer's one colour pair (``UNetConfig.shape_first_steps``)
PRIMER_COLOURS = ("红色", "蓝色")


def primer_scenes(n: int) -> list[Scene]:
    """The shape primer's pictures: the four shapes in turn, big, in the middle, flat, one colour on
    one background, so that the shape is all that differs between them."""
    colour, background = PRIMER_COLOURS
    return [Scene(shape=SHAPES[i % len(SHAPES)], colour=colour, background=background) for i in range(n)]


def primer_captions(scene: Scene) -> list[str]:
    """A primer picture's captions: its shape alone, and in the world's plainest phrasing."""
    return [f"一个{scene.shape}", scene.shape, f"一个{scene.colour}的{scene.shape}，{scene.background}背景"]


def caption(scene: Scene, rng: random.Random) -> str:
    """One Chinese caption of ``scene``, drawn with ``rng`` (a ``random.Random``)."""
    u = rng.random()
    if u < EMPTY_CAPTION_RATE:
        return ""
    if u < EMPTY_CAPTION_RATE + OUTSIDE_ONLY_RATE:
        return "，".join(rng.sample(OUTSIDE_WORDS, rng.randint(1, 3)))
    s = scene
    say_shape = rng.random() < 0.92
    say_colour = rng.random() < 0.85
    say_bg = rng.random() < 0.8
    say_size = rng.random() < 0.6
    say_pos = rng.random() < (0.4 if s.position == "中间" else 0.75)
    say_style = rng.random() < (0.3 if s.style == "扁平" else 0.8)
    say_painter = bool(s.painter) and rng.random() < 0.8

    extras = []
    if say_pos:
        extras.append(_position_phrase(s, rng))
    if say_style:
        extras.append(_style_phrase(s, rng))
    if say_painter:
        extras.append(_painter_phrase(s, rng))

    if say_shape:
        subject = _shape_phrase(s, rng, say_colour, say_size)
    elif say_colour:
        subject = rng.choice([f"{s.colour}的图形", f"一个{s.colour}的东西", f"{s.colour}"])
    else:
        subject = ""
    form = rng.random()
    if subject and say_bg and form < 0.3:
        # "蓝色背景上的一个红色圆形，在左边"
        parts = [f"{s.background}背景上的{subject}"] + extras
        rng.shuffle(extras)
        parts = [parts[0]] + extras
    elif form < 0.65:
        # subject first, then the rest in any order: "一个红色的圆形，蓝色背景，在左边"
        rest = extras + ([_background_phrase(s, rng)] if say_bg else [])
        rng.shuffle(rest)
        parts = ([subject] if subject else []) + rest
    else:
        # a list of prompt parts in any order, as learners write them
        parts = extras + ([_background_phrase(s, rng)] if say_bg else []) + ([subject] if subject else [])
        rng.shuffle(parts)
    if rng.random() < 0.45:                       # words from outside the world, anywhere
        for w in rng.sample(OUTSIDE_WORDS, rng.randint(1, 3)):
            parts.insert(rng.randint(0, len(parts)), w)
    text = rng.choice(["，", "，", "，", "、", " ", ","]).join(p for p in parts if p)
    if rng.random() < 0.35:
        text = rng.choice(FILLER_PREFIXES) + text
    if rng.random() < 0.3:
        text += rng.choice(FILLER_SUFFIXES)
    return text


def prompt_for(scene: Scene, parts: tuple = ("shape", "colour", "background")) -> str:
    """A plain prompt naming the chosen attributes, in the course's phrasing (for evaluation)."""
    s = scene
    subject = ("一个" + (s.size if "size" in parts else "") + (f"{s.colour}的" if "colour" in parts else "")
               + s.shape)
    out = [f"{s.style}风格"] if "style" in parts else []
    out.append(subject)
    if "background" in parts:
        out.append(f"{s.background}背景")
    if "position" in parts:
        out.append(f"在{s.position}")
    if "painter" in parts and s.painter:
        out.append(f"{s.painter}风格")
    return "，".join(out)


def vocabulary() -> set[str]:
    """Every word of the world (for tests: captions use nothing else besides fillers)."""
    words = set(COLOURS) | set(SHAPES) | set(SIZES) | set(POSITIONS) | set(STYLES) | {p for p in PAINTERS if p}
    return words


def dataset(n: int, seed: int = 0, captions_per_scene: int = 2, size: int = 128):
    """(images, scenes, captions) for training: ``captions_per_scene`` captions of each scene."""
    scenes = sample_scenes(n, seed)
    images = [render(s, size=size, seed=seed * 1_000_003 + i) for i, s in enumerate(scenes)]
    rng = random.Random(f"captions:{seed}")
    caps = [[caption(s, rng) for _ in range(captions_per_scene)] for s in scenes]
    return images, scenes, caps


def lora_dataset(n: int, seed: int = 0, size: int = 128, trigger: str = ""):
    """(images, captions) for the LoRA lesson: scenes drawn in the pastel look the base model
    never saw, with plain captions (the trigger word first when given; no empty captions)."""
    scenes = sample_scenes(n, seed=seed + 500_009)
    images = [render(s, size=size, seed=seed * 7_919 + i, lora_style=True) for i, s in enumerate(scenes)]
    rng = random.Random(f"lora-captions:{seed}")
    caps = []
    for s in scenes:
        text = ""
        while not text:
            text = caption(s, rng)
        caps.append(f"{trigger}，{text}" if trigger else text)
    return images, caps
