"""Relative links and #anchors in README.md, docs/*.md and the other Markdown
files shipped in the repository resolve: a renamed heading or moved file fails here,
not in a reader's browser. Anchors follow GitHub's heading slugs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def markdown_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for sub in ("examples", "deploy", "connectors", "policies", "workflows"):
        files += sorted((root / sub).glob("**/*.md"))
    return [f for f in files if f.is_file()]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation
    dropped (word characters, hyphens and spaces kept), spaces become hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _prose_lines(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            found.add(s if n == 0 else f"{s}-{n}")
        found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return found


def links(path: Path) -> list[str]:
    out = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        out += _LINK.findall(_INLINE_CODE.sub("", line))
    return out


def broken_links(files: list[Path]) -> list[str]:
    problems: list[str] = []
    cache: dict[Path, set[str]] = {}
    for f in files:
        for target in links(f):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, frag = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if not dest.exists():
                problems.append(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}: {target}: no such file")
                continue
            if frag and dest.suffix == ".md":
                if dest not in cache:
                    cache[dest] = anchors(dest)
                if frag not in cache[dest]:
                    problems.append(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}: {target}: no heading with that anchor")
    return problems


def test_slug_matches_github_headings() -> None:
    assert slug("Suggested policies (`proctor policy suggest`)") == "suggested-policies-proctor-policy-suggest"
    assert slug("Transparent sidecar (Kubernetes)") == "transparent-sidecar-kubernetes"
    assert slug("Checking an agent's environment: `proctor doctor`") == "checking-an-agents-environment-proctor-doctor"
    assert slug("`monitor.*` and [links](x.md)") == "monitor-and-links"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(
        "# Title\n\n## Same\n\n## Same\n\n"
        "[ok](b.md#there) [ok](#same-1) [ok](#title) [web](https://example.com/x#y)\n"
        "[gone](missing.md) [bad](b.md#nowhere) [bad](#same-2)\n"
        "`[code](not-a-link.md)`\n\n```\n[fenced](not-a-link.md)\n```\n",
        encoding="utf-8",
    )
    (tmp_path / "b.md").write_text("## There\n", encoding="utf-8")
    problems = broken_links([tmp_path / "a.md"])
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md: no such file",
        "b.md#nowhere: no heading with that anchor",
        "#same-2: no heading with that anchor",
    ]


def test_readme_and_docs_links_resolve() -> None:
    files = markdown_files()
    assert ROOT / "README.md" in files and ROOT / "docs" / "agents.md" in files
    assert sum(len(links(f)) for f in files) > 100  # the checker sees the docs' links
    assert broken_links(files) == []


def _cli_commands() -> set[str]:
    import click

    from proxy.cli import main

    found: set[str] = set()

    def walk(cmd: click.Command, path: str) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found.add(path)

    walk(main, "")
    return found


def readme_cli_rows(text: str) -> set[str]:
    """The commands the README's CLI table names: `proctor policy revisions` / `proctor policy
    rollback REV`, `proctor agents list\\|show` (alternatives), arguments and options dropped."""
    table = text.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in table.splitlines():
        if not row.startswith("| `proctor"):
            continue
        first_cell = row.split(" | ", 1)[0]
        for span in re.findall(r"`proctor ([^`]*)`", first_cell):
            words = span.replace("\\|", "|").split()
            if not words or words[0].startswith("-"):
                continue
            if len(words) > 1 and re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", words[1]):
                named.update(f"{words[0]} {sub}" for sub in words[1].split("|"))
            else:
                named.add(words[0])
    return named


def test_readme_cli_table_lists_every_command() -> None:
    commands = _cli_commands()
    named = readme_cli_rows((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "policy suggest" in commands and "netsetup" in commands
    assert sorted(commands - named) == [], "commands missing from the README's CLI table"
    assert sorted(named - commands) == [], "the README's CLI table names commands that do not exist"
