"""The README a new user reads: short, and every command, link and run-config key it names exists.

Checked on README.md: at most `MAX_LINES` lines; every `make <target>` is a Makefile target; every
`python -m <module>` is a module file of this repository; every relative link (and `#anchor`) resolves; every
run-config key it names (`key = value` in backticks, `` `key` = ``, a `--run-config "k=v ..."` snippet, or a
method-prefixed key such as `rcsr-router`) is a key of `[tool.flwr.app.config]` or of a method's section; its
methods table lists exactly the registered methods, each with key options that exist. The hand-written docs pages
it links to get the link check too.
The checkers themselves are tested on broken input, so a check that silently passes everything fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from common.method_config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300
# Hand-written pages; the generated results pages (docs/RESULTS.md, ...) belong to scripts/results.py.
PAGES = [README, ROOT / "deploy" / "README.md",
         *(ROOT / "docs" / f"{name}.md" for name in ("CONFIG", "DATA", "FIDELITY", "GRIDS", "MEASURED", "METHODS",
                                                     "PRIVACY", "PROTOCOL", "SEARCH", "TRUST"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
KEY = r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*"
# Flower's own parser of `--run-config` strings (flwr.common.config.parse_config_args).
FLWR_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
RUN_CONFIG = re.compile(r"--run-config\s+\"((?:[^\"\\]|\\.)*)\"", re.S)


# ------------------------------------------------------------------------------------------------------ parsing
def split_code(markdown: str) -> tuple[list[str], list[str], str]:
    """(fenced blocks, inline code spans, the prose with both removed)."""
    blocks = FENCE.findall(markdown)
    prose = FENCE.sub("", markdown)
    spans = [" ".join(s.split()) for s in INLINE.findall(prose)]
    return blocks, spans, INLINE.sub("", prose)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters, digits, `-` and `_` kept), spaces to
    `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def makefile_targets(makefile: str) -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9][\w.-]*)[ \t]*:(?!=)", makefile, re.M))


def pyproject_keys() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def section_keys() -> set[str]:
    return {f"{name}-{key}" for name, section in SECTIONS.items() if section
            for key in section().model_dump(by_alias=True)}


# ------------------------------------------------------------------------------------------------------ checkers
def named_make_targets(markdown: str) -> set[str]:
    blocks, spans, _ = split_code(markdown)
    return {t for chunk in [*blocks, *spans] for t in re.findall(r"(?:^|[\s;&|(])make[ \t]+([a-z][\w-]*)", chunk, re.M)}


def named_modules(markdown: str) -> set[str]:
    blocks, spans, _ = split_code(markdown)
    return {m for chunk in [*blocks, *spans] for m in re.findall(r"python3?\s+-m\s+([A-Za-z_][\w.]*)", chunk)}


def is_repo_module(module: str, root: Path = ROOT) -> bool:
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def link_problems(markdown: str, page: Path) -> list[str]:
    """Relative links of `page` whose file or `#anchor` does not exist."""
    problems = []
    _, _, prose = split_code(markdown)
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            problems.append(f"{page.name}: link to a missing file: {target}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
            problems.append(f"{page.name}: link to a missing anchor: {target}")
    return problems


def named_run_config_keys(markdown: str) -> set[str]:
    """Run-config keys the text names: `key = value` in backticks, `` `key` = ``, the keys of every
    `--run-config "..."` snippet, and backticked method-prefixed keys (`rcsr-router`; not `rcsr-*`)."""
    keys: set[str] = set()
    for snippet in RUN_CONFIG.findall(markdown):
        keys |= {k for k, _ in FLWR_PAIR.findall(snippet.replace("\\\n", " ")) if re.fullmatch(KEY, k)}
    fenceless = FENCE.sub("", markdown)
    keys |= set(re.findall(rf"`({KEY})[ \t]*=[ \t]*[^`=\s][^`]*`", fenceless))
    keys |= set(re.findall(rf"`({KEY})`[ \t]+=[ \t]", fenceless))
    prefixes = "|".join(re.escape(name) for name, section in SECTIONS.items() if section)
    keys |= set(re.findall(rf"`((?:{prefixes})-[a-z0-9]+(?:-[a-z0-9]+)*)`", fenceless))
    return keys


def methods_table(markdown: str) -> dict[str, list[str]]:
    """The table under the README's `## Methods` heading: method (first column) -> the backticked names in its last
    column (its key options)."""
    section = re.search(r"^## Methods[ \t]*\n(.*?)(?=^## )", markdown, re.M | re.S)
    assert section, "the README has no '## Methods' section"
    rows = {}
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([^`]+)`", cells[0])
        if line.startswith("|") and name:
            assert name.group(1) not in rows, f"method {name.group(1)} listed twice"
            rows[name.group(1)] = INLINE.findall(cells[-1])
    return rows


# ------------------------------------------------------------------------------------------------------ the README
@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


def test_the_readme_is_short(readme: str) -> None:
    lines = len(readme.splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail into a docs/ page (at most {MAX_LINES})"


def test_every_make_target_it_names_exists(readme: str) -> None:
    named = named_make_targets(readme)
    assert {"demo", "test"} <= named, "the two commands are `make demo` and `make test`"
    missing = named - makefile_targets((ROOT / "Makefile").read_text())
    assert not missing, f"README names make targets the Makefile lacks: {sorted(missing)}"


def test_every_python_module_it_names_is_in_the_repo(readme: str) -> None:
    named = named_modules(readme)
    assert named, "the README names no `python -m` command"
    missing = sorted(m for m in named if not is_repo_module(m))
    assert not missing, f"README runs modules that are not files of this repository: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert page.exists(), f"{page} is missing"
    problems = link_problems(page.read_text(), page)
    assert not problems, "\n".join(problems)


def test_the_readme_links_every_docs_page_it_moved_text_to(readme: str) -> None:
    _, _, prose = split_code(readme)
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose)}
    unlinked = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README links none of: {unlinked}"


def test_every_run_config_key_it_names_exists(readme: str) -> None:
    named = named_run_config_keys(readme)
    assert {"method", "modality-mix", "data-dir"} <= named, "the key extraction found too little to be trusted"
    unknown = named - pyproject_keys() - section_keys()
    assert not unknown, f"README names run-config keys pyproject.toml does not have: {sorted(unknown)}"


def test_the_methods_table_lists_every_registered_method_once_with_real_keys(readme: str) -> None:
    rows = methods_table(readme)
    assert sorted(rows) == sorted(SECTIONS), f"methods table {sorted(rows)} vs registered {sorted(SECTIONS)}"
    assert "fedprox-mu" in rows["fedprox"], f"the key options column was not read: {rows}"
    unknown = {k for options in rows.values() for k in options} - pyproject_keys() - section_keys()
    assert not unknown, f"the methods table names options that are no run-config keys: {sorted(unknown)}"


# ------------------------------------------------------------------------------------------------------ the checkers
def test_the_checkers_catch_broken_input(tmp_path: Path) -> None:
    """Each check must fail on what it is there to catch; otherwise the tests above prove nothing."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "PAGE.md").write_text("# Page\n\n## Real section\n")
    page = tmp_path / "README.md"
    text = ("See [a page](docs/PAGE.md), [a section](docs/PAGE.md#real-section), [gone](docs/GONE.md),\n"
            "[no such section](docs/PAGE.md#no-such-section), [the web](https://example.org/x.md) and\n"
            "[here](#top).\n\n# Top\n\n`make demo` and `make no-such-target`, `python -m scripts.simulate`,\n"
            "`python -m scripts.no_such_module`, `hash-loss = \"pairwise\"`, `no-such-key = 3`,\n"
            "`num-server-rounds` = 2, `rcsr-router`, `rcsr-no-such-knob`, `rcsr-*`.\n\n"
            "```bash\npython -m scripts.search build\n"
            "python -m scripts.simulate --run-config \"method='fedavg' \\\n  bogus-key=1 data-dir='/x y'\"\n```\n")
    page.write_text(text)
    assert sorted(link_problems(text, page)) == [
        "README.md: link to a missing anchor: docs/PAGE.md#no-such-section",
        "README.md: link to a missing file: docs/GONE.md"]
    assert named_make_targets(text) - makefile_targets((ROOT / "Makefile").read_text()) == {"no-such-target"}
    assert named_modules(text) == {"scripts.simulate", "scripts.no_such_module", "scripts.search"}
    assert [m for m in sorted(named_modules(text)) if not is_repo_module(m)] == ["scripts.no_such_module"]
    named = named_run_config_keys(text)
    assert {"hash-loss", "num-server-rounds", "rcsr-router", "method", "data-dir"} <= named
    assert named - pyproject_keys() - section_keys() == {"no-such-key", "rcsr-no-such-knob", "bogus-key"}
    assert "rcsr" not in named and "rcsr-*" not in named


def test_slugs_follow_github() -> None:
    assert slug("The demo run: scores, speed and size") == "the-demo-run-scores-speed-and-size"
    assert slug("Backbones (`backbone` key)") == "backbones-backbone-key"
    assert slug("Per-node settings") == "per-node-settings"
    assert anchors("# A\n\n## A\n\n```\n# not a heading\n```\n") == {"a", "a-1"}
