"""Every command the docs show is a real one, every link goes somewhere, every figure file exists.

A doc line that drifts from the code is the failure torchtitan's YAML shows (style.md §3): nothing
tested it against the program it runs. So this test reads README.md, docs/*.md and the bench/ and
docker/ READMEs, takes each line of a fenced code block that runs `make` or `pgolf` (also
`.venv/bin/pgolf`, `python -m pgolf.cli`, after `NAME=value` prefixes and inside `$(...)`), and
checks it against the real thing:
- `make`: each target is defined in Makefile or mk/*.mk, each `NAME=value` names a make variable
  there; `BENCH_ARGS` parses with bench/cpu.py's own parser and `LAUNCH_FLAGS` with `pgolf launch`'s;
- `pgolf`: the real parser (`pgolf.cli.build_parser`) accepts the arguments, and each `NAME=value`
  prefix is a config field's environment name (or a variable the CLI reads).
Usage notation is read as documentation means it: `[--flag]` is checked with the flag given,
`a|b|c` as each of a, b and c (a synopsis: names and flags checked, required arguments not),
`...`/`…` as nothing. Commands named in prose (`code spans`) are checked the same way as synopses.
It also checks that every relative markdown link resolves to a file, and that every
`bench/figures/...` path a doc names exists (figures you can trace: bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# other pages whose commands and links are checked too (not manuals: no README row needed)
PAGES = [REPO / "bench" / "README.md", REPO / "bench" / "figures" / "README.md", REPO / "docker" / "README.md"]
ENV_ASSIGN = re.compile(r"^[A-Z_][A-Z0-9_]*=")
# Environment names the CLI or the pipeline reads that are not config fields.
EXTRA_ENV = {"PRESET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "HF_TOKEN",
             "IMAGE_DIGEST", "CODE_SHA256", "PYTHONPATH"}


def fenced_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) for every line inside ``` fences, backslash continuations joined."""
    out: list[tuple[int, str]] = []
    fence = False
    pending: tuple[int, str] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            continue
        if pending is not None:
            start, text = pending
            raw, n = text + " " + raw.strip(), start
            pending = None
        if raw.rstrip().endswith("\\"):
            pending = (n, raw.rstrip()[:-1])
            continue
        out.append((n, raw.strip()))
    return out


def split_command(line: str) -> list[list[str]]:
    """The pgolf/make commands in one shell line: itself and any $(...) inside it, env prefixes kept."""
    inner = re.findall(r"\$\(([^()]*)\)", line)
    outer = re.sub(r"\$\([^()]*\)", "SUBST", line)
    found = []
    for text in [outer, *inner]:
        text = text.removeprefix("$ ")
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError:  # an unbalanced quote in prose-like output; not a command
            continue
        for cut in ("|", "&&", ";", ">", "2>"):  # a real shell pipe or list ends the command
            if cut in tokens:
                tokens = tokens[:tokens.index(cut)]
        i = 0
        while i < len(tokens) and ENV_ASSIGN.match(tokens[i]):
            i += 1
        if i < len(tokens) and (tokens[i] in ("make", "pgolf") or tokens[i].endswith("/bin/pgolf")):
            found.append(tokens)
        elif "-m" in tokens and "pgolf.cli" in tokens[tokens.index("-m"):][:2]:  # torchrun/python -m pgolf.cli
            k = tokens.index("-m")
            found.append(tokens[:i] + ["pgolf"] + tokens[k + 2:])
    return found


def inline_spans(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every `code span` in prose (outside fences)."""
    out: list[tuple[int, str]] = []
    fence = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            out += [(n, span) for span in re.findall(r"`([^`]+)`", line)]
    return out


def inline_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in DOCS + PAGES:
        for n, span in inline_spans(path):
            for tokens in split_command(span):
                out.append((f"{path.relative_to(REPO)}:{n}", tokens))
    return out


def commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in DOCS + PAGES:
        for n, line in fenced_lines(path):
            for tokens in split_command(line):
                out.append((f"{path.relative_to(REPO)}:{n}", tokens))
    return out


def expand_usage(argv: list[str]) -> list[list[str]]:
    """Usage notation to concrete argument lists: [x] -> x, a|b -> a and b, ... and … dropped."""
    flat: list[list[str]] = [[]]
    for tok in argv:
        tok = tok.strip("[]") if tok.startswith("[") or tok.endswith("]") else tok
        if tok in ("", "...", "…"):
            continue
        if "|" in tok and not tok.startswith("-"):
            flat = [a + [alt] for a in flat for alt in tok.split("|")]
        else:
            flat = [a + [tok] for a in flat]
    return flat


@lru_cache(maxsize=1)
def make_defs() -> tuple[frozenset[str], frozenset[str]]:
    """(targets, variables) of Makefile and mk/*.mk; a variable a rule reads counts as settable."""
    targets: set[str] = set()
    variables: set[str] = set()
    for mk in [REPO / "Makefile", *sorted((REPO / "mk").glob("*.mk"))]:
        for line in mk.read_text().splitlines():
            if line.startswith("#"):
                continue
            variables.update(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", line))
            if line.startswith(("\t", ".")):
                continue
            var = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|\+=|=)", line)
            if var:
                variables.add(var.group(1))
                continue
            rule = re.match(r"^([A-Za-z0-9_./$()-][A-Za-z0-9_./$() -]*?)\s*:(?!=)", line)
            if rule:
                targets.update(rule.group(1).split())
    return frozenset(targets), frozenset(variables)


@lru_cache(maxsize=1)
def config_env_names() -> frozenset[str]:
    from pgolf.config import field_types

    return frozenset(name.upper() for name in field_types())


def pgolf_parse(argv: list[str]) -> str | None:
    """None if the real parser accepts argv, else why not."""
    from pgolf.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        return f"pgolf {' '.join(argv)!r} does not parse (exit {exc.code})"
    return None


@lru_cache(maxsize=1)
def bench_cpu():
    spec = importlib.util.spec_from_file_location("pgolf_bench_cpu", REPO / "bench" / "cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def pgolf_names(argv: list[str]) -> str | None:
    """For a command named in prose (`pgolf results push`, `pgolf quantize RUN --compare`): None if each
    subcommand word exists and each --flag belongs to the subcommand it follows, else why not.
    Required arguments may be left out here; a fenced command must parse whole."""
    from pgolf.cli import build_parser

    parser = build_parser()
    for tok in argv:
        if tok == "--":  # what follows is another program's command line
            break
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if tok.startswith("-"):
            if tok.split("=", 1)[0] not in parser._option_string_actions:
                return f"{parser.prog} has no option {tok}"
        elif subs and not tok.startswith("<"):
            if tok not in subs[0].choices:
                return f"{parser.prog} has no subcommand {tok!r}"
            parser = subs[0].choices[tok]
    return None


def check_make(tokens: list[str]) -> list[str]:
    targets, variables = make_defs()
    problems = []
    k = tokens.index("make")
    for tok in tokens[:k]:
        name = tok.split("=", 1)[0]
        if name not in variables:
            problems.append(f"{name} is not a make variable")
    for argv in expand_usage(tokens[k + 1:]):
        assigns = dict(t.split("=", 1) for t in argv if ENV_ASSIGN.match(t))
        for tok in argv:
            if ENV_ASSIGN.match(tok):
                name = tok.split("=", 1)[0]
                if name not in variables:
                    problems.append(f"{name} is not a make variable")
            elif tok.startswith("-"):
                problems.append(f"make option {tok} (docs call make with targets and variables only)")
            elif tok not in targets:
                problems.append(f"make target {tok!r} is not defined in Makefile or mk/*.mk")
        if "BENCH_ARGS" in assigns:
            try:
                bench_cpu().parse_args(shlex.split(assigns["BENCH_ARGS"]))
            except SystemExit:
                problems.append(f"BENCH_ARGS={assigns['BENCH_ARGS']!r} is not valid for bench/cpu.py")
        if "LAUNCH_FLAGS" in assigns:
            why = pgolf_parse(["launch", "sky/record.yaml", *shlex.split(assigns["LAUNCH_FLAGS"])])
            if why:
                problems.append(f"LAUNCH_FLAGS: {why}")
    return problems


def check_pgolf(tokens: list[str], whole: bool = True) -> list[str]:
    problems = []
    k = next(i for i, t in enumerate(tokens) if t == "pgolf" or t.endswith("/bin/pgolf"))
    known = config_env_names() | EXTRA_ENV
    for tok in tokens[:k]:
        name = tok.split("=", 1)[0]
        if name not in known:
            problems.append(f"{name} is neither a config field's environment name nor read by pgolf")
    for argv in expand_usage(tokens[k + 1:]):
        why = pgolf_parse(argv) if whole else pgolf_names(argv)
        if why:
            problems.append(why)
    return problems


CMDS = commands()
INLINE = inline_commands()


def is_make(tokens: list[str]) -> bool:
    return "make" in tokens and not any(t == "pgolf" or t.endswith("/bin/pgolf") for t in tokens)


def test_docs_show_commands() -> None:
    # the extraction itself: the front door's commands are found, so an empty list cannot pass
    shown = {" ".join(t) for where, t in CMDS if where.startswith("README.md")}
    assert {"make test", "make demo", "make launch SEED=1337", "make results"} <= shown, sorted(shown)
    assert len(CMDS) > 50


@pytest.mark.parametrize("where,tokens", CMDS, ids=[w for w, _ in CMDS])
def test_doc_command_is_real(where: str, tokens: list[str]) -> None:
    # a line with alternatives (`pgolf data fetch|build|inspect`) is a synopsis of several commands:
    # their names and flags must exist, their required arguments are not spelled out
    synopsis = any("|" in t and not t.startswith("-") for t in tokens)
    problems = check_make(tokens) if is_make(tokens) else check_pgolf(tokens, whole=not synopsis)
    assert not problems, f"{where}: {' '.join(tokens)}\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("where,tokens", INLINE, ids=[w for w, _ in INLINE])
def test_command_named_in_prose_is_real(where: str, tokens: list[str]) -> None:
    # prose names commands by part (`pgolf results push`), so required arguments may be missing,
    # but every target, variable, subcommand and flag it names must exist
    problems = check_make(tokens) if is_make(tokens) else check_pgolf(tokens, whole=False)
    assert not problems, f"{where}: {' '.join(tokens)}\n  " + "\n  ".join(problems)


def test_checker_has_teeth() -> None:
    assert check_make(["make", "no-such-target"])
    assert check_make(["make", "bench", "BENCH_ARGS=--no-such-flag"])
    assert check_make(["make", "launch", "NO_SUCH_VAR=1"])
    assert check_make(["make", "launch", "LAUNCH_FLAGS=--no-such-flag"])
    assert check_pgolf(["pgolf", "results", "fetch"])
    assert check_pgolf(["pgolf", "run", "--preset", "seed", "--seeed", "1"])
    assert check_pgolf(["NO_SUCH_KNOB=1", "pgolf", "train"])
    assert not check_pgolf(["TTT_LR=2e-4", "pgolf", "evaluate", "runs/X"])
    assert not check_pgolf(["pgolf", "results", "push"], whole=False)
    assert check_pgolf(["pgolf", "results", "fetch"], whole=False)
    assert check_pgolf(["pgolf", "quantize", "RUN", "--compair"], whole=False)
    assert expand_usage(["pull", "RUN_ID", "...", "[--if-exists]"]) == [["pull", "RUN_ID", "--if-exists"]]
    assert expand_usage(["data", "fetch|inspect"]) == [["data", "fetch"], ["data", "inspect"]]
    assert split_command('eval "$(pgolf store env)"') == [["pgolf", "store", "env"]]
    assert split_command("torchrun --nproc_per_node=8 -m pgolf.cli train --preset seed") == [
        ["pgolf", "train", "--preset", "seed"]]


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to '-',
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    fence = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        heading = None if fence else re.match(r"^#{1,6} (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_relative_links_resolve() -> None:
    broken = []
    for path in DOCS + PAGES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                dest = path.parent / file if file else path
                if not dest.exists():
                    broken.append(f"{path.relative_to(REPO)}:{n}: {target}")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{path.relative_to(REPO)}:{n}: {target} (no such heading)")
    assert not broken, "links to nothing:\n" + "\n".join(broken)
    assert {"launch-on-8h100-sxm", "baseline-and-seed-are-their-sources-fixes-live-in-seed-plus"} <= (
        anchors(REPO / "docs" / "launch.md") | anchors(REPO / "docs" / "model.md"))


def test_manuals_link_both_ways() -> None:
    # the front door lists every doc, and each manual leads back to it (architecture.md is the
    # reference page of the rooms and arrows rather than a manual: linked from the README, not back)
    readme = (REPO / "README.md").read_text()
    for doc in DOCS[1:]:
        assert f"(docs/{doc.name}" in readme, f"README.md does not link docs/{doc.name}"
        if doc.name != "architecture.md":
            assert "](../README.md" in doc.read_text(), f"docs/{doc.name} does not link back to README.md"


FIGURE = re.compile(r"bench/figures/[A-Za-z0-9_.\-/]*[A-Za-z0-9_]")


def test_quoted_figure_files_exist() -> None:
    named = {(doc, m) for doc in DOCS + PAGES
             for m in FIGURE.findall(doc.read_text())}
    assert named, "no doc names a bench/figures file"
    missing = sorted(f"{doc.relative_to(REPO)}: {m}" for doc, m in named if not (REPO / m).exists())
    assert not missing, "figure files named but not committed:\n" + "\n".join(missing)


# Dotted names that are not importable by design: a placeholder in an example, a logger name, and a
# module that exists only inside the generated train_gpt.py.
NOT_MODULES = {"pgolf.x", "pgolf.compile", "pgolf.__bundle__"}
DOTTED = re.compile(r"\bpgolf(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
SOURCE_PATH = re.compile(r"\b(?:src/)?pgolf/[A-Za-z0-9_/]+\.py\b")


def resolves(dotted: str) -> bool:
    """True if `dotted` is a module, or an attribute reached from the longest importable module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_named_modules_and_sources_exist() -> None:
    # docs name modules (`pgolf.data.verify`), functions (`pgolf.train.train`) and files
    # (`pgolf/data/fetch.py`); when code moves between rooms, the page that names it must move too
    stale = []
    for path in DOCS + PAGES:
        text = path.read_text()
        for dotted in sorted(set(DOTTED.findall(text)) - NOT_MODULES):
            if not resolves(dotted):
                stale.append(f"{path.relative_to(REPO)}: {dotted}")
        for file in sorted(set(SOURCE_PATH.findall(text))):
            if not (REPO / "src" / file.removeprefix("src/")).exists():
                stale.append(f"{path.relative_to(REPO)}: {file}")
    assert not stale, "docs name code that is not there:\n" + "\n".join(stale)
    assert resolves("pgolf.data.verify.verify_dataset") and not resolves("pgolf.data.verify.no_such_name")
