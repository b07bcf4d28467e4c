"""File names of any bytes: how they are shown, linked, written to JSON and kept short enough.

On POSIX a file name is bytes, not text: scraped files and copies of old disks carry names that
are not valid UTF-8. Python reads such a byte as a lone surrogate (PEP 383: byte ``0xNN`` ->
``U+DCNN``), so every path in freesegdiff is the exact file. Where a name leaves the program:

- JSON files (``<stem>.json``, ``failures.json``, ``coco_results.json``, ``results.json``)
  write it with ``json.dumps``' ASCII escapes: byte ``0xFF`` is ``"\\udcff"``. Python's
  ``json.load`` gives the same string back, and ``os.fsencode`` (or ``open``) turns it into the
  exact bytes; other JSON readers see a lone surrogate (jq shows U+FFFD).
- Text for people (the summary, ``index.html``, the explain figure, ``results.md``):
  :func:`display_name`, which shows an undecodable byte as ``\\xff``.
- Links in ``index.html``: :func:`url_path`, percent-encoded from the name's bytes (``%FF``),
  so the browser opens the very file.
- Names longer than the folder allows (255 bytes on most file systems):
  :func:`fit_name_length` shortens an output stem and keeps it unique with a hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import PurePath
from urllib.parse import quote

# Longest file name (bytes) the common file systems take: ext4, XFS, Btrfs, APFS, NTFS (255
# UTF-16 units there: fewer bytes is always safe).
NAME_MAX = 255

__all__ = ["NAME_MAX", "display_name", "fit_name_length", "name_bytes", "quoted", "url_path"]


def name_bytes(name: str | PurePath) -> bytes:
    """The bytes of a file name as the file system holds it (undecodable bytes restored)."""
    return os.fsencode(os.fspath(name))


def display_name(name: str | PurePath) -> str:
    """``name`` as text a person can read and any UTF-8 file can hold.

    Valid names come back unchanged; each byte that is not UTF-8 (a lone surrogate
    ``U+DC80``-``U+DCFF`` in Python's string) becomes ``\\xNN``.
    """
    text = os.fspath(name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return name_bytes(text).decode("utf-8", errors="backslashreplace")
    return text


def quoted(name: str | PurePath) -> str:
    """``'name'`` for a message: :func:`display_name` in single quotes."""
    return f"'{display_name(name)}'"


def url_path(name: str | PurePath) -> str:
    """A relative link to ``name`` (a POSIX path): percent-encoded from its bytes."""
    return quote(name_bytes(name))


def fit_name_length(stem: str, longest_suffix: int, limit: int = NAME_MAX) -> str:
    """``stem`` unchanged when ``stem`` + a suffix of ``longest_suffix`` bytes fits in
    ``limit`` bytes; else cut (at a character boundary) and ended by ``~`` and 8 hex digits of
    the whole stem's SHA-256, so that two long stems that share a beginning stay apart.

    Returns:
        a stem whose name with the longest suffix takes at most ``limit`` bytes.
    """
    encoded = name_bytes(stem)
    if len(encoded) + longest_suffix <= limit:
        return stem
    tag = "~" + hashlib.sha256(encoded).hexdigest()[:8]
    room = limit - longest_suffix - len(tag)
    if room < 1:
        raise ValueError(f"no stem fits in {limit} bytes beside a {longest_suffix}-byte suffix")
    kept, used = [], 0
    for character in stem:  # whole characters only: a valid name stays valid
        size = len(name_bytes(character))
        if used + size > room:
            break
        kept.append(character)
        used += size
    return "".join(kept) + tag
