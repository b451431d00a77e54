"""The ``fomo-ray`` command: prepare / pretrain / run / sweep / report / score / budget / ui / export / tracking-server.

One module per command in this package, and the only place with argparse: each subcommand forwards its remaining
arguments to the ``main(argv)`` of ``fomo_ray.cli.<command>``, imported only when used, so the heavy libraries
(Ray, MLflow, FFCV) load only for the command that needs them.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:function, one-line help)
    "prepare": ("fomo_ray.cli.prepare:main", "build FiF-mini, convert real FiF data / web shards, write stream files"),
    "pretrain": ("fomo_ray.cli.pretrain:main", "pretrain (or reuse the cached) tiny base CLIP on FiF-mini's pool"),
    "run": ("fomo_ray.cli.run:main", "one continual run of the loop (plain PyTorch, no Ray)"),
    "sweep": ("fomo_ray.cli.sweep:main", "a Ray Tune sweep from a sweep YAML"),
    "report": ("fomo_ray.cli.report:main", "tables and plots from a saved results table"),
    "score": ("fomo_ray.cli.score:main", "A_KA / A_ZS / GM and trajectories from a saved results table"),
    "budget": ("fomo_ray.cli.budget:main", "Tab.4-style MAF compute-budget table for a backbone"),
    "ui": ("fomo_ray.cli.ui:main", "start the MLflow UI on 127.0.0.1 for the project's store"),
    "export": ("fomo_ray.cli.export:main", "write a run's deployed model in open_clip's format"),
    "tracking-server": ("fomo_ray.cli.tracking_server:main", "a cluster's authenticated MLflow server (head node)"),
}


def _usage() -> str:
    lines = ["usage: fomo-ray [--version] <command> [args...]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'fomo-ray <command> --help' for a command's options."]
    return "\n".join(lines)


def dispatch(prog: str, noun: str, table: dict[str, tuple[str, str]], usage: str, argv: list[str] | None) -> int:
    """``argv[0]`` names an entry of ``table``; the rest goes to that entry's ``module:function`` (imported lazily)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        import difflib

        close = difflib.get_close_matches(name, list(table), n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        print(f"{prog}: unknown {noun} '{name}'.{hint} Valid: {', '.join(table)}", file=sys.stderr)
        return 2
    module, func = table[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        from fomo_ray import __version__

        print(f"fomo-ray {__version__}")
        return 0
    return dispatch("fomo-ray", "command", COMMANDS, _usage(), argv)


if __name__ == "__main__":
    sys.exit(main())
