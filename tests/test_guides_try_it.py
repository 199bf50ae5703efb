"""Each integration guide's "Try it" runs as written, from a clean checkout: its first shell block
is run by bash, command for command, in a copy of the checkout's tracked config/ (no secret
files, no CREDENTIALS_DIRECTORY, no PHONEPUSH_* variables), with the phonepush under test first
on PATH. Every command must succeed, and the dry run must show the page the guide promises."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = sorted((ROOT / "docs" / "integrations").glob("*.md"))
_TRY_IT = re.compile(r"^## Try it\n(.*?)(?=^## |\Z)", re.M | re.S)
_SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)
#: The promise after the block: "... and the page: **Title** — "text", with `Play:...` ..."
_PROMISE = re.compile(r"the page: \*\*(.+?)\*\* — \"(.+?)\"(.*?)\.\n\n", re.S)


def _try_it(guide: Path) -> tuple[str, str]:
    found = _TRY_IT.search(guide.read_text())
    assert found, f"{guide.name} has no '## Try it' section"
    section = found.group(1)
    block = _SH_BLOCK.search(section)
    assert block, f"{guide.name}: no ```sh block under 'Try it'"
    return block.group(1), section[block.end() :]


def _clean_checkout(destination: Path) -> Path:
    """The files of config/ that git tracks, as a fresh clone has them."""
    tracked = subprocess.run(
        ["git", "ls-files", "config"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked, "config/ holds no tracked files"
    for name in tracked:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, target)
    return destination


@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_try_it_runs_as_written(guide: Path, tmp_path: Path) -> None:
    script, after = _try_it(guide)
    checkout = _clean_checkout(tmp_path / "checkout")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PHONEPUSH_") and k != "CREDENTIALS_DIRECTORY"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{guide.name}:\n{result.stdout}\n{result.stderr}"
    out = result.stdout
    assert f"{guide.stem}.toml: OK" in out, out

    promise = _PROMISE.search(after)
    assert promise, f"{guide.name}: no 'the page: **Title** — \"text\"' after the commands"
    title, text, rest = promise.groups()
    assert f"<Title>{html.escape(title, quote=False)}</Title>" in out, out
    assert html.escape(text, quote=False) in out, out
    for uri in re.findall(r"`((?:Play|Display):[^`]+)`", rest):
        assert f'URL="{uri}"' in out, (uri, out)
