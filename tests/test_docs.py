"""Every section of the README and of docs/ runs as copied: its ``python`` blocks, top to bottom, in
a fresh interpreter and an empty folder, with no network. Sketches (code that needs a GPU, several
processes or a download) use a ``py`` fence after a line that says "Sketch:", and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")


def _blocks(path: Path) -> list[tuple[str, str, str, int]]:
    """``(section, language, code, line)`` of each fenced block; a section is a ``#``/``##`` heading."""
    out, section, lang, start, code = [], "(top)", None, 0, []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if lang is None and m:
            lang, start, code = m.group(1), n, []
        elif lang is not None and line.startswith("```"):
            out.append((section, lang, "\n".join(code) + "\n", start))
            lang = None
        elif lang is not None:
            code.append(line)
        elif re.match(r"#{1,2} ", line):
            section = line.lstrip("#").strip()
    assert lang is None, f"{path.name}: a fence opened at line {start} is never closed"
    return out


def _sections() -> list:
    params = []
    for path in PAGES:
        sections: dict[str, list[str]] = {}
        for section, lang, code, _ in _blocks(path):
            if lang == "python":
                sections.setdefault(section, []).append(code)
        for section, codes in sections.items():
            source = "\n".join(codes)
            heavy = re.search(r"^\s*(import|from) (transformers|bitsandbytes|torchao|peft)\b", source, re.M)
            marks = [pytest.mark.slow] if heavy else []
            params.append(pytest.param(path, section, source, marks=marks,
                                       id=f"{path.relative_to(ROOT)}::{section}"))
    return params


SECTIONS = _sections()


def test_every_page_has_runnable_code_and_the_readme_is_a_front_page():
    files = {p.relative_to(ROOT).as_posix() for p, *_ in (s.values for s in SECTIONS)}
    assert "README.md" in files and len(files) >= 7, files
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) <= 120, f"README.md has {len(readme)} lines: move the detail to docs/"
    first = next(line for _, lang, _, line in _blocks(ROOT / "README.md") if lang == "python")
    assert first <= 50, f"the README's first example starts at line {first}, below the first screen"


def test_sketches_are_marked_and_nothing_else_hides_python():
    for path in PAGES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for _, lang, _, start in _blocks(path):
            assert lang in ("python", "py", "", "bash", "text"), f"{path.name}:{start}: fence {lang!r}"
            if lang == "py":  # a sketch: the paragraph just above says so
                above = "\n".join(lines[max(0, start - 6):start - 1])
                assert "Sketch:" in above, f"{path.name}:{start}: a `py` block is a sketch; say so above it"


def test_every_guide_is_linked_from_the_readme_and_in_the_site():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    mkdocs = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
        assert f": {page.name}" in mkdocs, f"mkdocs.yml's nav lacks {page.name}"
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target


def test_the_api_reference_lists_every_exported_name():
    import lora_inject

    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in lora_inject.__all__ if f"::: lora_inject.{name}\n" not in api + "\n"]
    assert not missing, f"docs/api.md has no entry for {missing}"


@pytest.mark.parametrize("path, section, source", SECTIONS)
def test_section_runs_alone_in_a_fresh_interpreter(path, section, source, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-"], input=source, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (f"{path.name}, section {section!r}, run alone, failed:\n"
                                  f"{done.stderr[-4000:]}")
