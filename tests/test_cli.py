"""The ``reid-ray`` command as a user meets it: help, the toy zoo, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

COMMANDS = ["synth", "embed", "index", "search", "evaluate", "train", "rerank", "demo"]


def run_cli(*args: str, timeout: float = 300, columns: int = 200) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", COLUMNS=str(columns))
    return subprocess.run(
        [sys.executable, "-m", "reid_ray.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def every_command_path() -> list[list[str]]:
    """Every command and sub-command of the app, as argument lists."""
    from reid_ray.cli import click_command

    paths, todo = [], [([], click_command())]
    while todo:
        path, command = todo.pop()
        paths.append(path)
        todo.extend(([*path, n], c) for n, c in (getattr(command, "commands", None) or {}).items())
    return sorted(paths)


def test_every_help_page_reads_at_80_columns():
    """Help pages through a pipe at 80 columns: nothing wider, no boxes, no type noise,
    required options marked, one example per command (rendered in-process, as a pipe)."""
    from reid_ray.cli import GUIDE, click_command

    root = click_command()
    for path in every_command_path():
        ctx = root.make_context("reid-ray", [*path, "--help"], resilient_parsing=True)
        command, sub_ctx = root, ctx
        for name in path:
            command = command.commands[name]
            sub_ctx = command.make_context(name, [], parent=sub_ctx, resilient_parsing=True)
        page = command.get_help(sub_ctx)
        where = " ".join(path) or "reid-ray"
        assert max(map(len, page.splitlines())) <= 80, where
        for noise in ("<bool>", "<int", "<str>", "<float>", "list[", "x>=", "╭", "│"):
            assert noise not in page, (where, noise)
        assert page.startswith(f"Usage: reid-ray {' '.join(path)}".rstrip()), where
        assert "Example" in page, where
        for param in command.params:
            if param.required:
                block = page.split(param.opts[0], 1)[1].split("\n  -", 1)[0]
                assert "required" in block, (where, param.opts[0])
        for line in GUIDE.examples.get(" ".join(path), ()):
            assert line.splitlines()[0] in page


def test_help_is_the_same_in_a_narrow_pipe_and_a_wide_one():
    narrow, wide = run_cli("embed", "--help", columns=80), run_cli("embed", "--help")
    assert narrow.returncode == wide.returncode == 0
    assert narrow.stdout == wide.stdout
    assert "--manifest FILE" in narrow.stdout and "[default: 0 = automatic]" in narrow.stdout
    assert "[required]" in narrow.stdout and "reid-ray embed --manifest" in narrow.stdout


def test_a_usage_error_is_one_line_with_exit_2():
    result = run_cli("embed", "--model", "timm:x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: Missing option '--manifest'. (see 'reid-ray embed --help')"
    ]
    typo = run_cli("embedd")
    assert typo.returncode == 2 and "Did you mean 'embed'?" in typo.stderr
    assert len(typo.stderr.strip().splitlines()) == 1


def test_help_lists_every_stage():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout or "--gallery" in result.stdout


def test_synth_writes_a_usable_manifest(tmp_path):
    from reid_ray.data import read_manifest

    out = tmp_path / "zoo"
    result = run_cli(
        "synth", "--out", str(out), "--individuals", "12", "--images-per", "3", "--size", "96"
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(str(out / "metadata.csv"), split_file=str(out / "split.csv"))
    assert len(manifest) == 36 and manifest.errors.num_rows == 0
    assert manifest.to_pandas()["identity"].nunique() == 12
    assert set(pd.read_csv(out / "split.csv")["split"]) <= {
        "train",
        "val",
        "query",
        "gallery",
        "query_unknown",
    }


def test_bad_arguments_fail_fast_with_one_clear_message(tmp_path):
    result = run_cli("evaluate", "--manifest", str(tmp_path / "absent.csv"), "--model", "timm-random:resnet18",
                     "--out", str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 2
    assert "manifest not found" in result.stderr and "Traceback" not in result.stderr

    (tmp_path / "m.csv").write_text("image_id,path\na,a.jpg\n")
    result = run_cli(
        "embed",
        "--manifest",
        str(tmp_path / "m.csv"),
        "--model",
        "resnet18",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    assert "timm:resnet18" in result.stderr and "Traceback" not in result.stderr


def test_tables_written_to_a_log_keep_every_cell(tmp_path):
    """Into a pipe or a file rich would cut a table to 80 columns (``┃ rou… ┃``)."""
    header = ["round", "annotations", "top-1", "top-5", "mAP", "NMI", "ARI", "pseudo-labels",
              "clusters", "train seconds", "evaluate seconds"]  # fmt: skip
    script = (
        "from reid_ray.console import metrics_table, summary\n"
        f"metrics_table('al rounds', {header!r}, [[1, 120, 0.5, 0.7, 0.41, 0.8, 0.6, 300, 45,"
        " 123.4, 56.7]])\n"
        "summary('evaluate', [('output', '/a/long/path/' * 12)])\n"
    )
    env = dict(os.environ, COLUMNS="80")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    for name in header:
        assert f" {name} " in result.stdout
    assert "/a/long/path/" * 12 in result.stdout
