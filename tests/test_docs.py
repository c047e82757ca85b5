"""The docs: the options page is the generator's output, every option is on it, the README stays short, links resolve."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from finetune.training.config import build_parser

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


COMMAND_SCRIPTS = sorted([*(ROOT / "data_prep").glob("*.py"), ROOT / "finetune" / "evaluate" / "__main__.py",
                          ROOT / "finetune" / "push_to_hub.py", ROOT / "finetune" / "interpolate.py",
                          ROOT / "finetune" / "seeds.py",
                          *(ROOT / "benchmarks").glob("*.py"),
                          *(ROOT / "scripts").glob("*.py")])
# Options of other tools the docs quote: NeMo's Hydra flags (the NeMo mapping page), pip's, and the README's
# placeholder for "any option".
FOREIGN_OPTIONS = {"--config-path", "--config-name", "--no-deps", "--option"}


class _ParserBuilt(Exception):
    def __init__(self, parser):
        self.parser = parser


def command_options() -> set[str]:
    """Every option of every command the docs can name: finetune/train.py, the data_prep tools, finetune.evaluate,
    the benchmarks and scripts (each run up to its argument parsing), and accelerate launch."""
    import argparse
    import runpy

    from accelerate.commands.launch import launch_command_parser

    from finetune.training.config import build_parser

    options = {o for action in build_parser()._actions for o in action.option_strings}
    options |= {o for action in launch_command_parser()._actions for o in action.option_strings}

    def stop(parser, *args, **kwargs):
        raise _ParserBuilt(parser)

    saved_path, saved_modules, saved_argv = list(sys.path), set(sys.modules), sys.argv
    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = stop
    try:
        for script in COMMAND_SCRIPTS:
            if "ArgumentParser" not in script.read_text():
                continue
            sys.argv = [str(script)]
            try:
                runpy.run_path(str(script), run_name="__main__")
            except _ParserBuilt as built:
                options |= {o for action in built.parser._actions for o in action.option_strings}
            except SystemExit:
                pass
            finally:  # scripts put their folders on sys.path: none may shadow finetune's modules afterwards
                sys.path[:] = saved_path
                for name in set(sys.modules) - saved_modules:
                    if not name.startswith(("finetune", "data_prep", "torch", "transformers")):
                        sys.modules.pop(name, None)
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = saved_argv
    return options


def test_every_option_a_docs_page_names_exists():
    """An option written in the README or a docs page (``--name`` or ``--name-with-dashes``) is an option of one of
    the project's commands, or of accelerate launch: renamed or removed options cannot linger in the docs."""
    import re

    known = command_options() | FOREIGN_OPTIONS
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {(match, page.name) for page in pages
             for match in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", page.read_text())}
    unknown = sorted((option, page) for option, page in named if option not in known)
    assert not unknown, f"docs name options no command has: {unknown}"
