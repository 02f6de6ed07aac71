"""What the product says to its users: every --help screen describes every option, and no text a user reads
(README, docs/, the model card, RESULTS, the sample photos' provenance, --help, `dgaetok info` of the bundled
model, the comments, docstrings and messages of scripts/ and benchmarks/) speaks of how the project is developed
rather than of the tool."""
from __future__ import annotations

import io
import json
import re
import tokenize
from pathlib import Path

import pytest
import typer
from PIL import Image
from safetensors import safe_open
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

# The scripts in scripts/ and benchmarks/ are read by users who train or benchmark on their own (or rented) machines.
# They legitimately take their output folder from $OUT and default to the project's data beside the clone
# (../shared/data), so those two categories do not apply to them; the rest does, and `files_at` still counts.
SCRIPT_INTERNAL = {**{what: pattern for what, pattern in INTERNAL.items()
                      if what not in ("the device's output folder", "the project's data beside the clone")},
                   "the device's output folder": r"\bfiles_at\b"}
SCRIPTS = sorted(p for p in [*(ROOT / "scripts").iterdir(), *(ROOT / "benchmarks").glob("*.py"),
                             *(ROOT / "benchmarks").glob("*.sh")] if p.is_file() and p.suffix in (".py", ".sh"))

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


def internal_terms(text: str, patterns: dict[str, str] = INTERNAL, first_line: int = 1) -> list[str]:
    found = []
    for what, pattern in patterns.items():
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            line = first_line + text[:m.start()].count("\n")
            found.append(f"line {line}: {m.group(0)!r} ({what})")
    return found


def prose(text: str, python: bool) -> list[tuple[int, str]]:
    """What a reader of a script reads as words, as (first line, text): a shell script whole (its commands are
    short and name no identifiers of the project's development); of Python, the comments and string literals
    (docstrings, --help texts, messages), f-strings without their {expressions}, so that variable names are not
    read as prose. Command-line option names are left out everywhere: they are an interface that scripts and users
    already call (an old alias such as --session-minutes stays working), not text."""
    if not python:
        parts = [(1, text)]
    else:
        parts = []
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.STRING and re.match(r"[rRbBuU]*[fF]", tok.string):  # Python < 3.12
                string, previous = tok.string, None
                while string != previous:
                    previous, string = string, re.sub(r"\{[^{}]*\}", "", string)
                parts.append((tok.start[0], string))
            elif tok.type in (tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", None)):
                parts.append((tok.start[0], tok.string))
    return [(line, re.sub(r"(?<![\w-])--[A-Za-z][\w-]*", "--option", part)) for line, part in parts]


def script_terms(text: str, python: bool) -> list[str]:
    return [term for line, part in prose(text, python) for term in internal_terms(part, SCRIPT_INTERNAL, line)]


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


def test_the_script_scan_reads_the_words_not_the_code():
    """Comments, docstrings, help texts and messages are read; identifiers, f-string expressions and option names
    are not; $OUT and ../shared/data are a script's own defaults."""
    python = ('"""Train for issue 12."""\n'
              'session = Session()  # on a lent GPU\n'
              'parser.add_argument("--session-minutes", help="the session\'s minutes")\n'
              'print(f"{session.get(\'status\')}: see files_at")\n'
              'out = os.environ.get("OUT", "../shared/data/train")  # $OUT, else ../shared/data\n')
    found = script_terms(python, python=True)
    assert [term.split(":")[0] for term in found] == ["line 1", "line 2", "line 3", "line 4"], found
    assert script_terms("# the device call: run(command=..., carry=[...])\nout=${OUT:-runs/x}\n", python=False)
    assert script_terms("out=${OUT:-runs/x}  # or $OUT\ndata=../shared/data/train\n", python=False) == []
    assert script_terms("python benchmarks/table2.py --session-minutes 30\n", python=False) == []


def test_the_scripts_are_scanned():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"scripts/gpu_default.sh", "scripts/gpu_default.py", "scripts/gpu_default_collect.py",
            "scripts/gpu_env.sh", "scripts/make_gpu_pack.py", "scripts/paper_gpu.sh", "scripts/throughput_gpu.sh",
            "benchmarks/paper_gpu.py", "benchmarks/table2.py", "benchmarks/few_step.sh"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_scripts_speak_of_the_tool_only(path):
    assert script_terms(path.read_text(), python=path.suffix == ".py") == []


def test_help_screens_speak_of_the_tool_only():
    found = {" ".join(path) or "dgaetok": terms for path, _ in commands()
             if (terms := internal_terms(help_screen(path)))}
    assert found == {}


@pytest.mark.parametrize("name", ["default", "default-1step"])
def test_the_bundled_models_speak_of_the_tool_only(name):
    """What `info` prints of a bundled model, and every metadata field of its file (the latent statistics' source
    among them), whether `info` shows it or not."""
    path = ROOT / "weights" / f"{name}.safetensors"
    result = runner.invoke(app, ["info", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert internal_terms(result.output) == []
    with safe_open(str(path), "pt") as fh:
        assert internal_terms(json.dumps(fh.metadata())) == []


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
