"""The documentation stays true to the code: every command in a code block of README.md and docs/*.md
that runs one of the project's scripts parses with that script's own argument parser, and the flag table
of docs/training.md lists exactly train.py's options (with the defaults it quotes in backticks)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = ("train.py", "test.py", "predict.py", "export.py", "bench.py", "dataset.py", "tools/mutants.py",
           "tools/compare_precision.py")
LAUNCHERS = ("torchrun", "torch.distributed.run")  # `torchrun ... train.py ...`, `python -m torch.distributed.run`
SEPARATORS = ("&&", "||", ";", "|")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
MAYBE_COMMAND = re.compile(r"(^|\s)(python3?|torchrun)\s")  # lines worth tokenizing
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def code_blocks(text: str) -> list[list[tuple[int, str]]]:
    """The fenced and the 4-space-indented code blocks of a Markdown text: lists of (line number, line)."""
    blocks, block, fence, previous_blank = [], None, None, True
    for number, line in enumerate(text.splitlines(), 1):
        if fence:  # inside a fenced block until a fence of the same character, at least as long
            if line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
                blocks.append(block)
                block, fence = None, None
            else:
                block.append((number, line))
            continue
        opening = FENCE.match(line)
        if opening:
            if block:
                blocks.append(block)
            block, fence = [], opening.group(1)
        elif line.startswith(("    ", "\t")) and line.strip() and (previous_blank or block is not None):
            if block is None:
                block = []
            block.append((number, line[4:] if line.startswith("    ") else line[1:]))
        elif line.strip() and block is not None:  # a paragraph line ends an indented block
            blocks.append(block)
            block = None
        previous_blank = not line.strip()
    if block:
        blocks.append(block)
    return blocks


def logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash continuations: (number of the first line, joined line)."""
    lines, pending, start = [], "", None
    for number, line in block:
        start = number if start is None else start
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending, start = "", None
    if pending:
        lines.append((start, pending))
    return lines


def script_call(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(script, argv) of one simple command: leading VAR=value assignments skipped; python SCRIPT ...,
    torchrun [launcher options] SCRIPT ... or python -m torch.distributed.run [...] SCRIPT ...; else None."""
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] in ("python", "python3") and len(tokens) > 1:
        if tokens[1] == "-m":
            if len(tokens) < 3 or tokens[2] not in LAUNCHERS:
                return None  # python -m pytest, ...
            tokens = tokens[2:]
        else:
            return tokens[1].removeprefix("./"), tokens[2:]
    if tokens[0] in LAUNCHERS:
        for index, token in enumerate(tokens):
            if token.endswith(".py"):
                return token.removeprefix("./"), tokens[index + 1:]
        raise ValueError("launcher without a .py script")
    return None


def doc_commands(text: str) -> list[tuple[int, str, str, list[str]]]:
    """(line number, shown command, script, argv) of every script call in the text's code blocks."""
    found = []
    for block in code_blocks(text):
        for number, line in logical_lines(block):
            line = line.strip().removeprefix("$ ")
            if not MAYBE_COMMAND.search(line):
                continue
            tokens = shlex.split(line, comments=True)
            simple = [[]]
            for token in tokens:
                if token in SEPARATORS:
                    simple.append([])
                elif token.endswith(";"):
                    simple[-1].append(token[:-1])
                    simple.append([])
                else:
                    simple[-1].append(token)
            for command in simple:
                call = script_call(command)
                if call:
                    found.append((number, " ".join(command), *call))
    return found


def strict(parser: argparse.ArgumentParser, prog: str) -> argparse.ArgumentParser:
    """No abbreviations: a renamed flag whose old name is a prefix of another must not pass."""
    parser.allow_abbrev, parser.prog = False, prog
    return parser


def load_script(script: str):
    if script.startswith("tools/"):
        name = "tools_" + Path(script).stem
        if name not in sys.modules:  # registered first: dataclasses look their module up while it executes
            spec = importlib.util.spec_from_file_location(name, REPO / script)
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        return sys.modules[name]
    return importlib.import_module(script.removesuffix(".py"))


def parse_error(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str | None:
    """None when the script's own parser accepts argv (--help included), else argparse's message."""
    module = load_script(script)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if script == "train.py":  # parse_args applies --recipe defaults, then parses again
                original = module.get_args_parser
                monkeypatch.setattr(module, "get_args_parser", lambda: strict(original(), script))
                module.parse_args(argv)
            else:
                strict(module.get_args_parser(), script).parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1]
    finally:
        monkeypatch.undo()
    return None


def test_the_extractor_finds_every_kind_of_command():
    text = "\n".join([
        "Text with python train.py --not-a-command in a paragraph.",
        "",
        "    $ python train.py --epochs 2 \\",
        "        --out weights/a   # a comment, the paper's",
        "    pip install -r requirements.txt && python dataset.py --check data/CamVid",
        "",
        "```bash",
        "CAMVID_ROOT=/data/CamVid python bench.py --device cpu; python -m pytest -q tests",
        "torchrun --standalone --nproc_per_node 2 train.py --recipe camvid",
        "python -m torch.distributed.run --nproc_per_node 2 train.py --lr 0.02",
        "python tools/mutants.py --list",
        "```",
        "",
        "~~~",
        "python predict.py --weights <run>/best.pth --input a.jpg --out masks",
        "~~~",
    ])
    assert [(number, script, argv) for number, _, script, argv in doc_commands(text)] == [
        (3, "train.py", ["--epochs", "2", "--out", "weights/a"]),
        (5, "dataset.py", ["--check", "data/CamVid"]),
        (8, "bench.py", ["--device", "cpu"]),
        (9, "train.py", ["--recipe", "camvid"]),
        (10, "train.py", ["--lr", "0.02"]),
        (11, "tools/mutants.py", ["--list"]),
        (15, "predict.py", ["--weights", "<run>/best.pth", "--input", "a.jpg", "--out", "masks"]),
    ]


def test_a_bad_flag_is_caught(monkeypatch):
    assert parse_error("train.py", ["--epochs", "2"], monkeypatch) is None
    assert "--epoch" in parse_error("train.py", ["--epoch", "2"], monkeypatch)  # no abbreviations
    assert "--crop" in parse_error("train.py", ["--crop"], monkeypatch)  # test.py's flag, not train.py's
    assert parse_error("test.py", ["--weights", "w.pth", "--crop"], monkeypatch) is None
    assert "--weights" in parse_error("test.py", ["--crop"], monkeypatch)  # a required flag missing


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(REPO)) for doc in DOCS])
def test_doc_commands_parse(doc, monkeypatch):
    commands = doc_commands(doc.read_text(encoding="utf-8"))
    if doc.name == "README.md":
        assert len(commands) >= 10, "README.md: the extractor found almost no commands"
    failures = []
    for number, shown, script, argv in commands:
        if script not in SCRIPTS:
            if not (REPO / script).is_file():
                failures.append(f"{doc.relative_to(REPO)}:{number}: {shown}: no such script {script}")
            continue
        error = parse_error(script, argv, monkeypatch)
        if error:
            failures.append(f"{doc.relative_to(REPO)}:{number}: {shown}\n    {error}")
    assert not failures, "\n".join(failures)


def flag_table(path: Path) -> list[tuple[list[str], str]]:
    """(flags of the first cell, default cell) of each row of the one table whose header starts '| flag |'."""
    lines = path.read_text(encoding="utf-8").splitlines()
    headers = [index for index, line in enumerate(lines) if re.match(r"\|\s*flag\s*\|\s*default\s*\|", line)]
    assert len(headers) == 1, f"{path.name}: expected one '| flag | default | ... |' table, found {len(headers)}"
    rows = []
    for line in lines[headers[0] + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append((re.findall(r"`(--[A-Za-z0-9][A-Za-z0-9-]*)`", cells[0]), cells[1]))
    return rows


def train_actions() -> dict[str, argparse.Action]:
    import train

    return {option: action for action in train.get_args_parser()._actions for option in action.option_strings
            if option not in ("-h", "--help")}


def test_training_md_flag_table_lists_every_train_flag():
    table = {flag for flags, _ in flag_table(REPO / "docs" / "training.md") for flag in flags}
    parser = set(train_actions())
    assert (sorted(table - parser), sorted(parser - table)) == ([], []), (
        f"docs/training.md lists flags train.py does not have: {sorted(table - parser)}; "
        f"misses train.py flags: {sorted(parser - table)}")


def default_matches(text: str, default) -> bool:
    if text in ("on", "off"):
        return default is (text == "on") or (text == "off" and default is None)
    if isinstance(default, bool):
        return False
    if isinstance(default, (int, float)):
        try:
            return float(text) == default
        except ValueError:
            return False
    if isinstance(default, (list, tuple)):
        return text.split() == [str(value) for value in default]
    return text == str(default)


def test_training_md_flag_table_defaults_are_train_defaults():
    actions, wrong = train_actions(), []
    for flags, cell in flag_table(REPO / "docs" / "training.md"):
        quoted = re.fullmatch(r"`([^`]*)`", cell)
        if quoted and flags and flags[0] in actions and not default_matches(quoted.group(1), actions[flags[0]].default):
            wrong.append(f"{flags[0]}: table says {cell}, train.py's default is {actions[flags[0]].default!r}")
    assert not wrong, "docs/training.md:\n" + "\n".join(wrong)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    text = path.read_text(encoding="utf-8")
    in_code = {number for block in code_blocks(text) for number, _ in block}
    found, seen = set(), {}
    for number, line in enumerate(text.splitlines(), 1):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and number not in in_code:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(REPO)) for doc in DOCS])
def test_doc_links_resolve(doc):
    """Every relative link (and image) names a file of the repository, and every #anchor a heading there."""
    text = doc.read_text(encoding="utf-8")
    in_code = {number for block in code_blocks(text) for number, _ in block}
    broken = []
    for number, line in enumerate(text.splitlines(), 1):
        if number in in_code:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            path = (doc.parent / name).resolve() if name else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO)}:{number}: {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.relative_to(REPO)}:{number}: {target}: no heading #{anchor}")
    assert not broken, "\n".join(broken)


def option_helps(script: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[argparse.Action, str]]:
    """Each option of the script's parser and its entry in --help, on one line (no wrapping)."""
    monkeypatch.setenv("COLUMNS", "10000")
    parser = load_script(script).get_args_parser()
    formatter = parser._get_formatter()
    return [(action, " ".join(formatter._format_action(action).split())) for action in parser._actions
            if action.option_strings and action.default is not argparse.SUPPRESS]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_once(script, monkeypatch):
    wrong = []
    for action, entry in option_helps(script, monkeypatch):
        mentions = len(re.findall(r"\bdefault\b", entry))
        if action.default is None and mentions > 1:
            wrong.append(f"{entry}: {mentions} defaults")
        elif action.default is not None and (mentions != 1 or f"(default: {action.default})" not in entry):
            wrong.append(f"{entry}: default {action.default!r} shown {mentions} times")
    assert not wrong, f"{script} --help:\n" + "\n".join(wrong)
