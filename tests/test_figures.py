"""The walkthrough's figures are made by a committed script from gemma2_ref's own code. The script runs headless
here (as in CI) and must produce every figure a chapter embeds; the committed copies must exist too."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "walkthrough"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Chapters 14 and 15 plot the committed experiment log with scripts/plot_experiments.py (tests/test_experiments.py
# runs that script); make_figures.py draws the figures computed from the model.
LOGGED_CHAPTERS = ("14-experiments.md", "15-post-training.md")


def embedded_figures() -> set[str]:
    names = set()
    for path in WALKTHROUGH.glob("[0-9][0-9]-*.md"):
        if path.name in LOGGED_CHAPTERS:
            continue
        names.update(re.findall(r"!\[[^\]]*\]\(figures/([^)]+\.png)\)", path.read_text()))
    return names


def test_chapters_embed_the_required_figures():
    assert {
        "block_diagram.png",
        "masks.png",
        "rope_frequencies.png",
        "softcap.png",
        "rmsnorm.png",
        "attention_map.png",
        "divergence.png",
        "kv_cache.png",
        "distillation.png",
    } <= embedded_figures()


def test_figures_script_runs_headless_and_makes_every_embedded_figure(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("DISPLAY", None)
    result = subprocess.run(
        [sys.executable, str(WALKTHROUGH / "make_figures.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    made = {p.name for p in tmp_path.glob("*.png")}
    missing = embedded_figures() - made
    assert not missing, f"chapters embed figures the script does not make: {sorted(missing)}"
    for name in made:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, f"{name} is not a real PNG"


def test_every_embedded_figure_is_committed():
    missing = [n for n in embedded_figures() if not (WALKTHROUGH / "figures" / n).is_file()]
    assert not missing, f"run `python walkthrough/make_figures.py` and commit: {missing}"
