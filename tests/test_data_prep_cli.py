"""The data_prep commands: --help, exit statuses, and every option documented (with its default) in the README."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_records, write_jsonl
from data_prep import convert, mine, score, split, validate

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"convert": convert, "validate": validate, "mine": mine, "split": split, "score": score}


def readme_section(tool: str) -> str:
    """The tool's section of the data-preparation page (was a README section)."""
    section = (ROOT / "docs" / "data-preparation.md").read_text()
    start = section.index(f"## {tool}\n")
    end = section.find("\n## ", start + 1)
    return section[start:end if end > 0 else None]


@pytest.mark.parametrize("tool", TOOLS)
def test_help(tool, capsys):
    with pytest.raises(SystemExit) as info:
        TOOLS[tool].main(["--help"])
    assert info.value.code == 0
    assert f"usage: python -m data_prep.{tool}" in capsys.readouterr().out


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_has_help_and_a_readme_row_with_its_default(tool):
    text = readme_section(tool)
    for action in TOOLS[tool].build_parser()._actions:
        if not action.option_strings or action.option_strings == ["-h", "--help"]:
            continue
        option = action.option_strings[0]
        assert action.help and action.help.strip(), f"{tool} {option} has no help"
        rows = [line for line in text.splitlines() if line.startswith("|") and f"`{option}`" in line]
        assert rows, f"{tool} {option} has no README row"
        default = action.default
        if default == "":
            assert '`""`' in rows[0], f"{tool} {option}: README should show the default \"\""
        elif isinstance(default, (int, float, str)) and not isinstance(default, bool) and "/" not in str(default):
            assert f"`{default}`" in rows[0], f"{tool} {option}: README should show the default {default!r}"


def test_exit_statuses_from_the_command_line(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", make_records(3))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "pos_doc": []}) + "\n")

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "data_prep.validate", *map(str, argv)], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    result = run(good, bad)
    assert result.returncode == 1 and f"{bad}, line 1, field 'pos_doc'" in result.stdout  # status 0: test_data_prep_validate
    missing = run(tmp_path / "missing.jsonl")
    assert missing.returncode == 2 and missing.stderr.startswith("error: Data file not found")
