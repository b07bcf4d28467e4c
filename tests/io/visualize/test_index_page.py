"""index.html: one card per overlay, links to explain / JSON, failures listed, names escaped."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from freesegdiff.io.visualize.index_page import write_index_page


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href"):
            self.hrefs.append(str(values["href"]))
        if tag == "img" and values.get("src"):
            self.images.append(str(values["src"]))


def _result_files(folder: Path, stem: str, explain: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (800, 400), (200, 10, 10)).save(folder / f"{stem}_overlay.png")
    Image.new("P", (800, 400)).save(folder / f"{stem}.png")
    if explain:
        Image.new("RGB", (100, 100)).save(folder / f"{stem}_explain.png")
    summary = {
        "caption": "a cat & a <bird>",
        "labels": [
            {"id": 0, "name": "background", "score": None},
            {"id": 1, "name": "cat", "score": 0.912},
        ],
    }
    (folder / f"{stem}.json").write_text(json.dumps(summary), encoding="utf-8")


def test_index_links_every_result_and_lists_failures(tmp_path: Path) -> None:
    _result_files(tmp_path, "cat photo")
    _result_files(tmp_path / "sub", "dog", explain=False)
    (tmp_path / "coco_results.json").write_text("[]", encoding="utf-8")
    path = write_index_page(tmp_path, failures={"broken.jpg": "cannot read <broken.jpg>"})
    assert path == tmp_path / "index.html"
    page = path.read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(page)
    assert parser.images == ["thumbnails/cat%20photo.jpg", "thumbnails/sub/dog.jpg"]
    for src in parser.images:
        with Image.open(tmp_path / src.replace("%20", " ")) as thumbnail:
            assert thumbnail.size == (256, 128)
    assert "cat%20photo_explain.png" in parser.hrefs
    assert "cat%20photo.json" in parser.hrefs
    assert "sub/dog.json" in parser.hrefs and "sub/dog_overlay.png" in parser.hrefs
    assert "coco_results.json" in parser.hrefs
    for href in parser.hrefs:
        assert (tmp_path / href.replace("%20", " ")).is_file(), href
    assert "a cat &amp; a &lt;bird&gt;" in page  # caption escaped
    assert "cat 0.91" in page
    assert "cannot read &lt;broken.jpg&gt;" in page
    assert "2 images segmented, 1 failed" in page


def test_index_of_an_empty_folder_says_so(tmp_path: Path) -> None:
    page = write_index_page(tmp_path).read_text(encoding="utf-8")
    assert "No results in this folder." in page
