"""A 6000 x 4000 photo runs in bounded memory (limits.working_size) and keeps its size.

Measured in fresh interpreters running the command line, as a user runs it: the peak resident
memory of the huge photo's run against that of a VOC-sized photo's, models and all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.heavy

RUN = """
import resource, sys
from freesegdiff.cli import main
code = main(sys.argv[1:])
print("peak-kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "code", code)
"""


def peak_of_segment(image, out) -> int:
    """Peak RSS in KB of ``freesegdiff segment image -o out --preset tiny`` in a new process."""
    command = [sys.executable, "-c", RUN, "segment", str(image), "-o", str(out)]
    done = subprocess.run(
        [*command, "--preset", "tiny", "--no-progress"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert words[words.index("code") + 1] == "0", done.stdout
    return int(words[words.index("peak-kb") + 1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KB on Linux")
def test_a_24_mpx_photo_costs_less_than_1_5_gb_more_than_a_voc_photo(tmp_path, photos):
    photo = Image.fromarray(photos["astronaut"])
    small, huge = tmp_path / "small" / "voc.jpg", tmp_path / "huge" / "big.jpg"
    small.parent.mkdir()
    huge.parent.mkdir()
    photo.resize((500, 375), Image.Resampling.BILINEAR).save(small, quality=90)
    photo.resize((6000, 4000), Image.Resampling.BILINEAR).save(huge, quality=90)
    small_peak = peak_of_segment(small, tmp_path / "out-small")
    huge_peak = peak_of_segment(huge, tmp_path / "out-huge")
    assert huge_peak - small_peak < 1.5 * 1024 * 1024, (small_peak, huge_peak)
    label_map = np.asarray(Image.open(tmp_path / "out-huge" / "big.png"))
    assert label_map.shape == (4000, 6000)  # back at the photo's size
    summary = json.loads((tmp_path / "out-huge" / "big.json").read_text())
    assert (summary["width"], summary["height"]) == (6000, 4000)
    areas = {entry["id"]: entry["area"] for entry in summary["labels"]}
    assert sum(areas.values()) == 6000 * 4000
    assert areas == {int(i): int((label_map == i).sum()) for i in np.unique(label_map)}
    overlay = Image.open(tmp_path / "out-huge" / "big_overlay.png")
    assert overlay.height == 1365 and overlay.width > 2048  # drawn at 2048 wide, legend beside
