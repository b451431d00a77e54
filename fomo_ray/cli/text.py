"""Help texts as people read them: the commands' descriptions are their docstrings, written for the docs
(``code``, `code`); ``--help`` shows them without the markup."""
from __future__ import annotations

import argparse
import re

_MARKUP = re.compile(r"``?([^`]+?)``?")


def plain(text: str) -> str:
    """``x`` and `x` -> x."""
    return _MARKUP.sub(r"\1", text)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose help and usage are :func:`plain`."""

    def format_help(self) -> str:
        return plain(super().format_help())

    def format_usage(self) -> str:
        return plain(super().format_usage())
