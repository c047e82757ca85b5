"""The docs: the options page is the generator's output, every option is on it, the README stays short, links resolve."""

import importlib.util
import re
from pathlib import Path

import pytest

from finetune.config import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPTIONS_PAGE = DOCS / "options.md"
MAX_README_LINES = 300
# [text](target) or ![alt](target), with an optional "title"; the target ends at the first space or ")".
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.fixture(scope="module")
def generator():
    """scripts/generate_options_doc.py, imported by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("generate_options_doc", ROOT / "scripts" / "generate_options_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def options_page(generator):
    return generator.render_options_page()


def test_options_page_is_up_to_date(options_page):
    assert OPTIONS_PAGE.read_text(encoding="utf-8") == options_page, \
        "docs/options.md is out of date: run `python scripts/generate_options_doc.py`"


def test_every_option_the_parser_accepts_is_on_the_options_page(options_page):
    accepted = [option for action in build_parser()._actions for option in action.option_strings
                if option.startswith("--") and option != "--help"]
    assert len(accepted) > 100  # ours plus transformers' TrainingArguments
    missing = [option for option in accepted if f"`{option}`" not in options_page]
    assert not missing, f"options missing from docs/options.md: {missing}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_keeps_the_test_commands():
    readme = README.read_text(encoding="utf-8")
    assert ".venv/bin/python -m pytest" in readme
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in readme  # the quick start CI checks


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)  # code blocks hold no links
    broken = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL, or an anchor on this page
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_links_every_docs_page():
    readme = README.read_text(encoding="utf-8")
    unlinked = [page.name for page in DOCS.glob("*.md") if f"](docs/{page.name})" not in readme]
    assert not unlinked, f"docs pages missing from the README's contents: {unlinked}"
