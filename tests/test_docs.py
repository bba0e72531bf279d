"""The README and docs/ against the repository they describe.

Every relative link (and #anchor) resolves, every script, bench, test file and ``python -m`` module the
pages name exists, the README stays a one-page read and gives CI's exact test command, every ``SLM_*``
variable the pages name is one the app (or set-up, or a test) reads, and every setting is documented
in docs/configuration.md. Pure file reading: no app, no model.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from slm_app import settings as settings_module

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"(?<!\!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
SLM_VAR = re.compile(r"\bSLM_[A-Z0-9_]*[A-Z0-9]\b")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _prose(text: str) -> str:
    """The page without its fenced code blocks (links and headings in code are not Markdown)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*~]|<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(_prose(text)):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(text: str) -> list[str]:
    targets = LINK.findall(_prose(text))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto:


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """What is wrong with each relative link of ``page`` (its text, or ``text`` standing in for it)."""
    text = page.read_text(encoding="utf-8") if text is None else text
    broken = []
    for target in relative_links(text):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if dest != page and not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif ROOT not in dest.parents:
            broken.append(f"{target}: points outside the repository")
        elif anchor and dest.suffix == ".md":
            if anchor not in anchors(text if dest == page else dest.read_text(encoding="utf-8")):
                broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


# What the pages may name as runnable or as a file of this repository.
SCRIPT = re.compile(r"(?<![\w/.-])\./([\w.-]+\.sh)\b")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:bench|tests|docs|slm_app|\.ci)/[\w/.-]*[\w])")
MODULE = re.compile(r"python\d*(?:\.\d+)?\s+-m\s+(slm_app(?:\.\w+)*)")
APP = re.compile(r"(?<![\w/.-])(app\.py)\b")


def named_commands(page: Path) -> list[tuple[str, Path]]:
    """(what the page says, the file that must exist), from prose and code blocks alike."""
    text = page.read_text(encoding="utf-8")
    found = [(f"./{m}", ROOT / m) for m in SCRIPT.findall(text)]
    found += [(m, ROOT / m) for m in REPO_PATH.findall(text)]
    found += [(m, ROOT / m) for m in APP.findall(text)]
    for module in MODULE.findall(text):
        base = ROOT.joinpath(*module.split("."))
        found.append((f"python -m {module}", base.with_suffix(".py") if not base.is_dir() else base / "__main__.py"))
    return found


IMPORT = re.compile(r"^\s*from\s+(slm_app(?:\.\w+)*)\s+import\s+([\w, ]+)$", re.M)


def top_level_names(code: str) -> set[str]:
    """Names a module defines or imports at its top level (re-exports included), read with ``ast``."""
    names: set[str] = set()
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def broken_imports(text: str) -> list[str]:
    """``from slm_app.x import a, b`` in a page's examples: the module's file exists and defines (or
    imports) each name. Read, not imported: the examples' modules may pull in TensorFlow."""
    broken = []
    for module, names in IMPORT.findall(text):
        base = ROOT.joinpath(*module.split("."))
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if not source.exists():
            broken.append(f"{module}: no {_rel(source)}")
            continue
        defined = top_level_names(source.read_text(encoding="utf-8"))
        for name in (n.strip() for n in names.split(",") if n.strip()):
            if name not in defined:
                broken.append(f"{module}.{name}: not defined in {_rel(source)}")
    return broken


def settings_classes() -> list[type[BaseSettings]]:
    return [cls for _, cls in inspect.getmembers(settings_module, inspect.isclass)
            if issubclass(cls, BaseSettings) and cls is not BaseSettings and cls.__module__ == settings_module.__name__]


def setting_variables() -> set[str]:
    """SLM_* names the app reads: every field of every settings class in slm_app.settings, with its prefix."""
    names = set()
    for cls in settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
            names.add((alias or f"{prefix}{name}").upper())
    return names


def tool_variables() -> set[str]:
    """SLM_* names read outside the app's settings: by the set-up scripts (``${SLM_X``) or by a test
    (``os.environ.get("SLM_X"``, ``os.environ["SLM_X"]``)."""
    names = set()
    for script in ROOT.glob("setup*.sh"):
        names |= set(re.findall(r"\$\{?(SLM_[A-Z0-9_]+)", script.read_text(encoding="utf-8")))
    for test in (ROOT / "tests").glob("*.py"):
        if test.name == Path(__file__).name:  # this file's own examples are not reads
            continue
        reads = r"environ(?:\.get\(|\[)\s*[\"'](SLM_[A-Z0-9_]+)[\"']"
        names |= set(re.findall(reads, test.read_text(encoding="utf-8")))
    return names


def test_there_are_pages_and_settings_to_check() -> None:
    assert README.exists() and len(PAGES) > 1, PAGES
    assert settings_classes(), "no pydantic-settings class found in slm_app.settings"
    assert {"SLM_TIER", "SLM_MODEL", "SLM_PARALLEL"} <= setting_variables()


def test_the_anchor_slugs_are_githubs() -> None:
    assert slug("TensorFlow backend (free and standard tiers)") == "tensorflow-backend-free-and-standard-tiers"
    assert slug("Perplexity against `llama-perplexity`") == "perplexity-against-llama-perplexity"
    assert slug("OpenAI-compatible `/v1`") == "openai-compatible-v1"
    assert slug("Every `SLM_*` setting") == "every-slm_-setting"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_caught() -> None:
    text = ("# Probe page\n\n[ok](../README.md#tiers) [self](#probe-page) [gone](missing.md) "
            "[bad anchor](configuration.md#no-such-heading) [self, wrong](#probe) [web](https://example.org/x)\n\n"
            "```\n[in code](nowhere.md)\n```\n")
    broken = broken_links(DOCS / "probe.md", text)
    assert [b.split(":")[0] for b in broken] == ["missing.md", "configuration.md#no-such-heading", "#probe"]


def test_every_docs_page_is_linked_from_the_readme() -> None:
    links = relative_links(README.read_text(encoding="utf-8"))
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links}
    assert [_rel(p) for p in PAGES[1:] if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_named_command_and_file_exists(page: Path) -> None:
    missing = [said for said, path in named_commands(page) if not path.exists()]
    assert missing == []
    scripts = [path for said, path in named_commands(page) if said.startswith("./")]
    assert all(p.stat().st_mode & 0o111 for p in scripts), scripts


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_slm_app_import_in_the_examples_resolves(page: Path) -> None:
    assert broken_imports(page.read_text(encoding="utf-8")) == []


def test_a_broken_import_is_caught() -> None:
    text = "from slm_app.settings import Settings, NoSuchThing\nfrom slm_app.nowhere import x\n"
    assert broken_imports(text) == ["slm_app.settings.NoSuchThing: not defined in slm_app/settings.py",
                                     "slm_app.nowhere: no slm_app/nowhere.py"]


def test_the_readme_names_the_commands_it_promises() -> None:
    said = {s for s, _ in named_commands(README)}
    assert {"./setup.sh", "app.py", ".ci/run"} <= said, said


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == ["./setup.sh --tests && .venv/bin/python -m pytest tests"]
    assert ci[0] in README.read_text(encoding="utf-8")


def test_the_readme_fits_on_a_page() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md is {lines} lines; keep it to {MAX_README_LINES}, the rest in docs/"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_slm_variable_named_exists(page: Path) -> None:
    known = setting_variables() | tool_variables()
    named = set(SLM_VAR.findall(page.read_text(encoding="utf-8")))
    assert sorted(named - known) == []


def test_every_setting_is_documented_in_the_configuration_page() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert sorted(v for v in setting_variables() if f"`{v}`" not in text) == []
