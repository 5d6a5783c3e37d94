"""A folder of training images read as kohya and EveryDream2 users lay them out.

Two layouts (`data.layout`; `auto` picks kohya when every folder directly under the root is named
`N_name` and the root holds no images itself, else `folders`):

kohya (sd-scripts' DreamBooth folders): `root/10_sks dog/IMG_0001.png` is an image of the folder
`10_sks dog`, which repeats 10 times per epoch and whose class tokens, `sks dog`, caption every image
without a caption file. Only images directly inside an `N_name` folder count; folders named
otherwise, or with N < 1, are ignored with a note, as kohya does. A caption file is
`<image stem><caption_extension>` and its first line is the caption.

folders (EveryDream2, and wb's own): images anywhere under the root (hidden names skipped). A caption
is the image's sidecar (`caption_extension`, else `.txt`, else `.caption`), else the file name up to
its first `_`. Per folder, as EveryDream2's data loader reads them: `multiply.txt` (repeats, may be
fractional), `flip_p.txt`, `cond_dropout.txt`, `shuffle_tags.txt` (present: shuffle) and
`local.yaml`/`local.yml` apply to that folder's images only; `global.yaml`/`global.yml` to the folder
and everything under it; an image's own `.yaml`/`.yml` sidecar to that image. The nearer one wins.
Their keys: `main_prompt`, `tags` (a list; `{tag, weight}` entries count by their tag), `caption`,
`multiply`, `flip_p`, `cond_dropout`, `shuffle_tags`; others (`rating`, `batch_id`, `loss_scale`,
`max_caption_length`, tag weights) are noted and ignored. When any yaml gives a main prompt or tags
the caption is built as EveryDream2 does: the main prompt, then the tags (the image's first).

Bad data never stops a run: an empty (0-byte) or unreadable image, or a caption file that is not
UTF-8, is skipped and listed (file and reason); a broken multiply.txt or yaml is noted and ignored.
A root with no usable image is an error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from PIL import Image

from workbench.errors import WorkbenchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
YAML_KEYS = {"main_prompt", "tags", "caption", "multiply", "flip_p", "cond_dropout", "shuffle_tags"}
ED2_IGNORED_KEYS = {"rating", "batch_id", "loss_scale", "max_caption_length", "image"}


@dataclass(frozen=True)
class Skipped:
    """An image left out, and why (the file named is the one at fault: image or caption)."""

    file: str
    reason: str


@dataclass
class Scan:
    """What a folder holds: examples (Example), files skipped, notes about ignored settings."""

    examples: list
    layout: str
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Bad(Exception):
    """A file that makes its image unusable: (file, reason)."""


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and _visible(path)


def check_image(path: Path) -> str | None:
    """Why the image cannot be trained on (empty, unreadable), or None when it reads."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            im.verify()  # structure and checksums, without decoding every pixel
    except Exception as e:  # PIL raises many kinds for broken files
        return f"cannot read the image ({type(e).__name__}: {e})"
    return None


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Bad(path, f"not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r})") from None
    except OSError as e:
        raise _Bad(path, f"cannot read ({e.strerror or e})") from None


def sidecar(image: Path, extension: str | None) -> Path | None:
    for suffix in [extension] if extension else CAPTION_SUFFIXES:
        path = image.with_suffix(suffix)
        if path.is_file():
            return path
    return None


def scan(root: Path, layout: str, caption_extension: str | None, field: str = "data.root") -> Scan:
    """Every usable image under `root` as an Example, sorted by path; errors name `field`."""
    if not root.is_dir():
        raise WorkbenchError(f"{field}: {root} is not a folder")
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    if layout == "auto":
        layout = "kohya" if _looks_like_kohya(root) else "folders"
    result = Scan([], layout)
    if layout == "kohya":
        _scan_kohya(root, caption_extension, result)
    else:
        _scan_folders(root, root, caption_extension, _Config(), result)
    result.examples.sort(key=lambda e: e.path)
    if not result.examples:
        found = "no usable images" if result.skipped else "no images"
        where = " in N_name folders" if layout == "kohya" else ""
        why = ""
        if result.skipped:
            first = result.skipped[0]
            why = f" ({len(result.skipped)} skipped, e.g. {first.file}: {first.reason})"
        raise WorkbenchError(f"{field}: {found} ({', '.join(IMAGE_SUFFIXES)}){where} under {root}{why}")
    return result


def _looks_like_kohya(root: Path) -> bool:
    entries = [p for p in root.iterdir() if _visible(p)]
    folders = [p for p in entries if p.is_dir()]
    return (
        bool(folders)
        and not any(_is_image(p) for p in entries)
        and all(KOHYA_FOLDER.match(p.name) for p in folders)
    )


def _example(root: Path, image: Path, caption: str, **options):
    from workbench.train.data import Example

    return Example(image.relative_to(root).as_posix(), caption, path=image, **options)


def _usable(image: Path, root: Path, result: Scan) -> bool:
    reason = check_image(image)
    if reason is not None:
        result.skipped.append(Skipped(image.relative_to(root).as_posix(), reason))
    return reason is None


# --- kohya ----------------------------------------------------------------------------------------


def _scan_kohya(root: Path, extension: str | None, result: Scan) -> None:
    for entry in sorted(p for p in root.iterdir() if _visible(p)):
        name = entry.relative_to(root).as_posix()
        if not entry.is_dir():
            if _is_image(entry):
                result.notes.append(f"{name}: not in an N_name folder, ignored (kohya layout)")
            continue
        match = KOHYA_FOLDER.match(entry.name)
        if match is None:
            result.notes.append(f"{name}/: not named N_name (repeats_class), ignored (kohya layout)")
            continue
        repeats, class_tokens = int(match[1]), match[2]
        if repeats < 1:
            result.notes.append(f"{name}/: {repeats} repeats, ignored")
            continue
        images = sorted(p for p in entry.iterdir() if _is_image(p))
        if not images:
            result.notes.append(f"{name}/: no images, ignored")
        nested = [p.name for p in entry.iterdir() if p.is_dir() and _visible(p)]
        if nested:
            result.notes.append(
                f"{name}/: subfolders are not read in the kohya layout ({', '.join(sorted(nested))})"
            )
        for image in images:
            if not _usable(image, root, result):
                continue
            path = sidecar(image, extension)
            try:
                text = read_text(path) if path is not None else None
            except _Bad as bad:
                result.skipped.append(Skipped(bad.args[0].relative_to(root).as_posix(), bad.args[1]))
                continue
            lines = text.splitlines() if text is not None else []
            caption = lines[0].strip() if lines else ("" if text is not None else class_tokens)
            result.examples.append(_example(root, image, caption, repeats=float(repeats)))


# --- EveryDream2 / wb folders -------------------------------------------------------------------------


@dataclass
class _Config:
    """EveryDream2's per-folder and per-image settings; None/empty: not set here."""

    main_prompts: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    multiply: float | None = None
    flip_p: float | None = None
    cond_dropout: float | None = None
    shuffle_tags: bool | None = None

    def over(self, base: _Config) -> _Config:
        """This config laid over `base`: set values win; prompts and tags come first."""
        pick = lambda a, b: a if a is not None else b  # noqa: E731
        return _Config(
            main_prompts=_unique(self.main_prompts + base.main_prompts),
            tags=_unique(self.tags + base.tags),
            multiply=pick(self.multiply, base.multiply),
            flip_p=pick(self.flip_p, base.flip_p),
            cond_dropout=pick(self.cond_dropout, base.cond_dropout),
            shuffle_tags=pick(self.shuffle_tags, base.shuffle_tags),
        )


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _split_caption(text: str) -> _Config:
    parts = [p.strip() for p in text.split(",")]
    return _Config(main_prompts=[parts[0]] if parts[0] else [], tags=[p for p in parts[1:] if p])


def _number(path: Path, root: Path, result: Scan, low: float, high: float) -> float | None:
    name = path.relative_to(root).as_posix()
    try:
        value = float(read_text(path).strip())
    except (_Bad, ValueError) as e:
        why = e.args[1] if isinstance(e, _Bad) else "not a number"
        result.notes.append(f"{name}: {why}, ignored")
        return None
    if not (math.isfinite(value) and low <= value <= high):
        result.notes.append(f"{name}: {value} is outside {low:g}..{high:g}, ignored")
        return None
    return value


def _yaml_config(path: Path, root: Path, result: Scan) -> _Config:
    name = path.relative_to(root).as_posix()
    try:
        data = yaml.safe_load(read_text(path)) or {}
    except (_Bad, yaml.YAMLError) as e:
        why = e.args[1] if isinstance(e, _Bad) else f"not valid YAML ({str(e).splitlines()[0]})"
        result.notes.append(f"{name}: {why}, ignored")
        return _Config()
    if not isinstance(data, dict):
        result.notes.append(f"{name}: not a mapping of settings, ignored")
        return _Config()
    ignored = sorted(set(data) - YAML_KEYS)
    if ignored:
        result.notes.append(f"{name}: {', '.join(map(str, ignored))} ignored (wb does not use them)")
    cfg = _Config()
    prompts = data.get("main_prompt")
    cfg.main_prompts = [str(p).strip() for p in ([prompts] if isinstance(prompts, str) else prompts or [])]
    weighted = False
    for tag in data.get("tags") or []:
        if isinstance(tag, dict):
            weighted |= tag.get("weight") not in (None, 1, 1.0)
            tag = tag.get("tag")
        if tag is not None and str(tag).strip():
            cfg.tags.append(str(tag).strip())
    if weighted:
        result.notes.append(f"{name}: tag weights ignored (every tag counts once)")
    for key, low, high in (("multiply", 0.0, 1e6), ("flip_p", 0.0, 1.0), ("cond_dropout", 0.0, 1.0)):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            result.notes.append(f"{name}: {key} {value!r} is not a number in {low:g}..{high:g}, ignored")
            continue
        setattr(cfg, key, float(value))
    if data.get("shuffle_tags") is not None:
        cfg.shuffle_tags = bool(data["shuffle_tags"])
    if isinstance(data.get("caption"), str):
        cfg = cfg.over(_split_caption(data["caption"]))
    return cfg


def _scan_folders(folder: Path, root: Path, extension: str | None, inherited: _Config, result: Scan) -> None:
    entries = sorted(p for p in folder.iterdir() if _visible(p))
    files = {p.name: p for p in entries if p.is_file()}
    glob = inherited
    for name in ("global.yaml", "global.yml"):
        if name in files:
            glob = _yaml_config(files[name], root, result).over(glob)
    local = _Config()
    for name, key, high in (("multiply.txt", "multiply", 1e6), ("flip_p.txt", "flip_p", 1.0),
                            ("cond_dropout.txt", "cond_dropout", 1.0)):  # fmt: skip
        if name in files:
            setattr(local, key, _number(files[name], root, result, 0.0, high))
    for name in ("local.yaml", "local.yml"):
        if name in files:
            local = _yaml_config(files[name], root, result).over(local)
    if "shuffle_tags.txt" in files:
        local.shuffle_tags = True
    folder_cfg = local.over(glob)
    for image in (p for p in entries if _is_image(p)):
        if not _usable(image, root, result):
            continue
        try:
            example = _folder_example(image, root, extension, folder_cfg, result)
        except _Bad as bad:
            result.skipped.append(Skipped(bad.args[0].relative_to(root).as_posix(), bad.args[1]))
            continue
        if example is not None:
            result.examples.append(example)
    for sub in (p for p in entries if p.is_dir()):
        _scan_folders(sub, root, extension, glob, result)


def _folder_example(image: Path, root: Path, extension: str | None, folder_cfg: _Config, result: Scan):
    caption_file = sidecar(image, extension)
    text = read_text(caption_file).strip() if caption_file is not None else None
    own = _Config()
    for suffix in (".yml", ".yaml"):
        path = image.with_suffix(suffix)
        if path.is_file():
            own = _yaml_config(path, root, result).over(own)
    cfg = own.over(folder_cfg)
    if not cfg.main_prompts and not cfg.tags:  # no yaml captions: the text as it is, as before
        caption = text if text is not None else image.stem.split("_", 1)[0].strip()
    else:  # EveryDream2's caption: main prompt, then tags (the image's own first)
        if text is not None:
            cfg = own.over(_split_caption(text)).over(folder_cfg)
        if not cfg.main_prompts:
            cfg.main_prompts = [image.stem.split("_", 1)[0].strip()]
        caption = ", ".join([cfg.main_prompts[0], *cfg.tags])
    options = {
        "repeats": 1.0 if cfg.multiply is None else cfg.multiply,
        "flip_p": cfg.flip_p,
        "cond_dropout": cfg.cond_dropout,
        "shuffle": bool(cfg.shuffle_tags),
    }
    return replace(_example(root, image, caption), **options)
