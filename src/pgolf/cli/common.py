"""Shared argparse helpers: config override flags generated from the config fields."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from pgolf import config as cfgmod


def add_config_flags(parser: argparse.ArgumentParser, preset_default: str | None = None) -> None:
    """`--preset` plus one `--field-name VALUE` flag per config field (env name in the help)."""
    parser.add_argument("--preset", default=preset_default, choices=list(cfgmod.PRESETS),
                        help="named preset (default: $PRESET or seed)")
    group = parser.add_argument_group("config overrides (each also readable from its env var)")
    for name, (section, typ) in cfgmod.field_types().items():
        flag = "--" + name.replace("_", "-")
        if any(flag in a.option_strings for a in parser._actions):
            continue
        choices = typing.get_args(typ) if typing.get_origin(typ) is typing.Literal else None
        group.add_argument(flag, dest=f"cfg_{name}", default=None, metavar=name.upper(),
                           choices=choices, help=f"[{section}] env {name.upper()}")


def resolve_config(args: argparse.Namespace, **explicit: Any) -> cfgmod.Config:
    """preset < env < CLI override flags < explicit values given by the command itself."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    return cfgmod.resolve(getattr(args, "preset", None), overrides)
