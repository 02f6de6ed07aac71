"""What the product says to its users: every --help screen describes every option, and no text a user reads
(README, docs/, the model card, RESULTS, the sample photos' provenance, --help, `dgaetok info` of the bundled
model) speaks of how the project is developed rather than of the tool."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from dgaetok.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# How this project is developed, which a user of the tool has no part in: machines lent to it, the tool that
# runs commands on them and what it returns, its limits, its issue numbers, the paths of its machines.
INTERNAL = {
    "lent machines": r"\blent\b|\blending\b",
    "device calls": r"device[ -]call|device tool|\bcarry=|\bgive_back\b|budget_left",
    "the device's output folder": r"\$OUT\b|files_at",
    "issue numbers": r"\bissues?[ -]?#?\d+|\(issue\b",
    "the project's data beside the clone": r"\.\./shared|\bshared/data\b",
    "its machines' paths": r"/work/",
    "sessions": r"\bsessions?\b",
    "the device tool's limits": r"64 MiB",
    "its machine": r"\bthe 2-core CPU\b|shared with other jobs|other agents?\b",
}

DOCS = [ROOT / "README.md", ROOT / "weights" / "README.md", ROOT / "benchmarks" / "RESULTS.md",
        ROOT / "examples" / "photos" / "PROVENANCE.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands():
    """Every command and command group of the CLI, as (argv prefix, click command)."""
    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def help_screen(path: list[str]) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def internal_terms(text: str) -> list[str]:
    found = []
    for what, pattern in INTERNAL.items():
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            line = text[:m.start()].count("\n") + 1
            found.append(f"line {line}: {m.group(0)!r} ({what})")
    return found


def test_the_terms_are_found_where_they_are():
    """The patterns catch what they are for, and spare the words that merely contain them."""
    for text in ("a GPU lent to us", "device call: run(...)", "in $OUT", "<files_at>", "(issue 5)", "issue-12",
                 "issues 4 and 6", "../shared/data/train", "/work/main", "every session", "the 64 MiB carry",
                 "on the 2-core CPU", "on a machine shared with other jobs"):
        assert internal_terms(text), text
    for text in ("excellent silent equivalents", "an issue tracker", "the device", "shared memory", "2 cores"):
        assert not internal_terms(text), text


def test_the_product_texts_exist():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "weights/README.md", "benchmarks/RESULTS.md", "docs/cli.md", "docs/training.md",
            "docs/tiling.md", "docs/sdvae.md", "docs/benchmarks.md", "docs/gpu.md"} <= names
    assert all(p.is_file() for p in DOCS)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_speak_of_the_tool_only(path):
    assert internal_terms(path.read_text()) == []


def test_help_screens_speak_of_the_tool_only():
    found = {" ".join(path) or "dgaetok": terms for path, _ in commands()
             if (terms := internal_terms(help_screen(path)))}
    assert found == {}


def test_info_of_the_bundled_model_speaks_of_the_tool_only():
    result = runner.invoke(app, ["info", str(ROOT / "weights" / "default.safetensors")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert internal_terms(result.output) == []


def test_every_option_of_every_command_has_help():
    missing = [f"{' '.join(path) or 'dgaetok'} {param.name}" for path, cmd in commands() for param in cmd.params
               if not (getattr(param, "help", None) or "").strip()]
    assert missing == []
    for path, cmd in commands():
        screen = help_screen(path)
        assert "<bool>" not in screen, path
        assert cmd.help and cmd.help.strip(), path


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), target


def test_sample_photos_are_small_real_and_accounted_for():
    folder = ROOT / "examples" / "photos"
    photos = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    provenance = (folder / "PROVENANCE.md").read_text()
    assert 6 <= len(photos) <= 8
    assert sum(p.stat().st_size for p in photos) < 1_000_000
    for photo in photos:
        with Image.open(photo) as im:
            assert max(im.size) <= 512 and min(im.size) >= 256, photo.name
        row = next(line for line in provenance.splitlines() if line.startswith(f"| `{photo.name}` |"))
        assert re.search(r"public domain|CC0", row, flags=re.IGNORECASE), row
