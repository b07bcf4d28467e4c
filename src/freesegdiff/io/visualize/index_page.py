"""``index.html`` for an output folder: a grid of overlay thumbnails, each linking to its files.

The page is built from what is in the folder, so it can be (re)written after any run:

- every ``<stem>_overlay.png`` (searched recursively) is one card: its thumbnail links to the
  overlay; under it, links to ``<stem>_explain.png``, ``<stem>.json`` and ``<stem>.png`` when they
  exist, and the caption and label names read from ``<stem>.json``;
- images that failed (passed in as ``failures``) get a card with the error message;
- ``coco_results.json`` is linked at the top when present.

Thumbnails are JPEG files under ``<folder>/thumbnails/`` so a folder of large photos opens fast.
Every name written into the page is HTML-escaped and every link URL-quoted; a file name that is
not UTF-8 is shown with ``\\xNN`` for its undecodable bytes and linked by its exact bytes
(:mod:`freesegdiff.io.filenames`). The page and the thumbnails are written atomically
(:mod:`freesegdiff.io.atomic`), and the same folder always gives the same bytes.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from freesegdiff.io.atomic import save_image, write_text
from freesegdiff.io.export import COCO_RESULTS_NAME
from freesegdiff.io.filenames import display_name, url_path
from freesegdiff.io.outputs import EXPLAIN_SUFFIX, INDEX_NAME, OVERLAY_SUFFIX, THUMBNAIL_FOLDER

log = logging.getLogger(__name__)


@dataclass
class IndexCard:
    """One image on the index page; paths are relative to the output folder (POSIX)."""

    stem: str
    overlay: str | None = None
    thumbnail: str | None = None
    explain: str | None = None
    json: str | None = None
    png: str | None = None
    caption: str | None = None
    labels: list[str] = field(default_factory=list)
    error: str | None = None


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _read_summary(path: Path) -> tuple[str | None, list[str]]:
    """Caption and segment names (background left out) from a ``<stem>.json`` summary."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("cannot read %s for the index page: %s", path, error)
        return None, []
    if not isinstance(summary, dict):
        return None, []
    caption = summary.get("caption")
    labels = []
    for entry in summary.get("labels") or []:
        if isinstance(entry, dict) and entry.get("id") not in (0, None):
            score = entry.get("score")
            name = str(entry.get("name"))
            labels.append(f"{name} {score:.2f}" if isinstance(score, (int, float)) else name)
    return (str(caption) if caption is not None else None), labels


def make_thumbnail(source: Path, target: Path, size: int) -> bool:
    """Write a JPEG of ``source`` fitting in ``size`` x ``size``; False if it cannot be read."""
    try:
        with Image.open(source) as image:
            image.thumbnail((size, size))
            target.parent.mkdir(parents=True, exist_ok=True)
            save_image(image.convert("RGB"), target, "JPEG", quality=85)
    except OSError as error:
        log.warning("cannot make a thumbnail of %s: %s", source, error)
        return False
    return True


def collect_cards(
    folder: Path, failures: Mapping[str, str] | None = None, thumbnail_size: int = 256
) -> list[IndexCard]:
    """One card per overlay found under ``folder`` (sorted by path), then one per failure."""
    cards: list[IndexCard] = []
    thumbnails = folder / THUMBNAIL_FOLDER
    for overlay in sorted(folder.rglob(f"*{OVERLAY_SUFFIX}")):
        if thumbnails in overlay.parents:
            continue
        stem = overlay.name[: -len(OVERLAY_SUFFIX)]
        relative_stem = _relative(overlay.parent / stem, folder)
        card = IndexCard(stem=relative_stem, overlay=_relative(overlay, folder))
        thumbnail = thumbnails / f"{relative_stem}.jpg"
        if make_thumbnail(overlay, thumbnail, thumbnail_size):
            card.thumbnail = _relative(thumbnail, folder)
        for attribute, name in (
            ("explain", f"{stem}{EXPLAIN_SUFFIX}"),
            ("json", f"{stem}.json"),
            ("png", f"{stem}.png"),
        ):
            if (overlay.parent / name).is_file():
                setattr(card, attribute, _relative(overlay.parent / name, folder))
        if card.json:
            card.caption, card.labels = _read_summary(folder / card.json)
        cards.append(card)
    for name, message in sorted((failures or {}).items()):
        cards.append(IndexCard(stem=str(name), error=str(message)))
    return cards


def _text(text: str) -> str:
    """Any text (a file name of any bytes too) as HTML."""
    return html.escape(display_name(text))


def _link(path: str, text: str) -> str:
    return f'<a href="{html.escape(url_path(path))}">{_text(text)}</a>'


def _card_html(card: IndexCard) -> str:
    stem = _text(card.stem)
    if card.error is not None:
        return (
            f'<figure class="card failed"><div class="missing">failed</div>'
            f"<figcaption><b>{stem}</b><p class=error>{_text(card.error)}</p>"
            f"</figcaption></figure>"
        )
    target = card.explain or card.overlay or ""
    if card.thumbnail:
        picture = f'<img src="{html.escape(url_path(card.thumbnail))}" alt="{stem} overlay">'
    else:
        picture = '<div class="missing">no thumbnail</div>'
    links = [
        _link(path, text)
        for path, text in (
            (card.overlay, "overlay"),
            (card.explain, "explain"),
            (card.json, "json"),
            (card.png, "label map"),
        )
        if path
    ]
    caption = f"<p class=caption>{_text(card.caption)}</p>" if card.caption else ""
    labels = "<p class=labels>" + _text(", ".join(card.labels)) + "</p>" if card.labels else ""
    return (
        f'<figure class="card"><a href="{html.escape(url_path(target))}">{picture}</a>'
        f"<figcaption><b>{stem}</b>{caption}{labels}"
        f"<p class=links>{' · '.join(links)}</p></figcaption></figure>"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }
.card { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 0.5em; }
.card img { width: 100%; aspect-ratio: 4 / 3; object-fit: contain; display: block;
            background: #f6f6f6; }
.card p { margin: 0.3em 0; font-size: 0.9em; }
.caption { font-style: italic; }
.error { color: #b00; white-space: pre-wrap; }
.missing { height: 120px; display: flex; align-items: center; justify-content: center;
           background: #eee; color: #888; }
.failed { border-color: #e99; }
"""


def render_index_html(cards: list[IndexCard], title: str, coco: str | None = None) -> str:
    """The whole page as text."""
    done = sum(card.error is None for card in cards)
    failed = len(cards) - done
    summary = f"{done} image{'s' if done != 1 else ''} segmented"
    if failed:
        summary += f", {failed} failed"
    extra = f" · {_link(coco, 'COCO results (RLE)')}" if coco else ""
    body = "\n".join(_card_html(card) for card in cards) or "<p>No results in this folder.</p>"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{_text(title)}</h1><p>{summary}{extra}. Click a picture for its "
        f'explain figure.</p>\n<div class="grid">\n{body}\n</div></body></html>\n'
    )


def write_index_page(
    folder: str | Path,
    *,
    failures: Mapping[str, str] | None = None,
    title: str = "freesegdiff results",
    thumbnail_size: int = 256,
) -> Path:
    """Write ``<folder>/index.html`` (and its thumbnails) for the results found in ``folder``.

    Args:
        folder: the output folder of a run (holding ``<stem>_overlay.png`` files).
        failures: ``{image name: error message}`` for images that could not be segmented.
        title: the page title.
        thumbnail_size: longest side of a thumbnail in pixels.

    Returns:
        The path of ``index.html``.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    cards = collect_cards(root, failures, thumbnail_size)
    coco = COCO_RESULTS_NAME if (root / COCO_RESULTS_NAME).is_file() else None
    path = root / INDEX_NAME
    return write_text(path, render_index_html(cards, title, coco))
