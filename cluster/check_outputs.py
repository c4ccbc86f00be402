"""Refuse a job command whose outputs are relative paths (run by slurm_ray.sbatch before Ray starts).

    python cluster/check_outputs.py python jobs/train_arcface.py --config jobs/configs/train_arcface.yaml

A job submitted with `ray job submit --working-dir .` runs inside Ray's unpacked copy of the
working dir, under the job's temp folder; a relative `--out` (or a relative `out:` in the
job's config) is written there and deleted with the temp folder when the Slurm job ends. So
every output must be absolute (on a file system every node sees) or a URL such as `s3://`.
Looks at `--out X`, `--out=X`, `--set ...out=X`, and the `out` keys of the `--config` file
(when the command line gives no `--out`); arguments holding a whole shell command (`bash -c
"..."`) are split and read too. Exit 2 with one line per relative output; 0 when none.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import sys

import yaml


def _is_relative(path: str) -> bool:
    return "://" not in path and not os.path.isabs(os.path.expanduser(path))


def _config_outs(node, where: str = "") -> list[tuple[str, str]]:
    """(key path, value) of every `out` key in a loaded YAML config."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{where}.{key}" if where else str(key)
            if key == "out" and isinstance(value, str):
                found.append((name, value))
            else:
                found.extend(_config_outs(value, name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_config_outs(value, f"{where}[{i}]"))
    return found


def _tokens(argv: list[str]) -> list[list[str]]:
    """The command itself, plus each argument that holds a shell command line, split."""
    commands = [argv]
    for arg in argv:
        if any(c.isspace() for c in arg):
            try:
                words = shlex.split(arg)
            except ValueError:
                continue
            # one shell line may chain several commands: split at && ; ||
            command: list[str] = []
            for word in words + [";"]:
                if word in {"&&", ";", "||", "|"}:
                    commands.append(command)
                    command = []
                else:
                    command.append(word)
    return [c for c in commands if c]


def relative_outputs(argv: list[str], cwd: pathlib.Path) -> list[str]:
    """A message for each relative output that `argv` (a job command) would write."""
    problems = []
    for command in _tokens(argv):
        outs, configs = [], []
        for i, arg in enumerate(command):
            nxt = command[i + 1] if i + 1 < len(command) else ""
            if arg == "--out":
                outs.append(("--out", nxt))
            elif arg.startswith("--out="):
                outs.append(("--out", arg.split("=", 1)[1]))
            elif arg == "--set" and "=" in nxt:
                key, value = nxt.split("=", 1)
                if key.split(".")[-1] == "out":
                    outs.append((f"--set {key}", value))
            elif arg == "--config":
                configs.append(nxt)
            elif arg.startswith("--config="):
                configs.append(arg.split("=", 1)[1])
        for flag, value in outs:
            if value and _is_relative(value):
                problems.append(f"{flag} {value} is relative")
        for config in configs if not outs else []:
            path = cwd / config
            if not path.is_file():
                continue  # the job reports a missing config itself
            for key, value in _config_outs(yaml.safe_load(path.read_text())):
                if _is_relative(value):
                    problems.append(f"{config}: {key}: {value} is relative (give --out)")
    return problems


def main(argv: list[str]) -> int:
    problems = relative_outputs(argv, pathlib.Path.cwd())
    for problem in problems:
        print(
            f"reid-ray: {problem}: a relative output lands in Ray's unpacked working dir, which "
            "is deleted when the job ends; give an absolute path on a shared file system or s3://",
            file=sys.stderr,
        )
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
