"""``unimm config show``: print a command's resolved configuration with each key's meaning."""

from __future__ import annotations

from typing import Annotated

import typer

from unimm.cli.options import RecipeOpt, SetOpt, user_errors

config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True, add_completion=False)


@config_app.command("show")
@user_errors
def show(
    command: Annotated[
        str,
        typer.Option("--command", help="Whose configuration: prepare, train, embed, ... \\[default: train]"),
    ] = "train",
    full: Annotated[bool, typer.Option("--full", help="Each key's whole description.")] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the configuration a command would run with (defaults <- --recipe <- --set), each key
    with what it means, and what the command would refuse in it."""
    from unimm.config.build import resolve_config
    from unimm.config.describe import COMMAND_CONFIGS, describe
    from unimm.errors import UnimmError

    if command not in COMMAND_CONFIGS:
        raise UnimmError(f"--command {command}: use one of {', '.join(COMMAND_CONFIGS)}")
    cfg, problems = resolve_config(COMMAND_CONFIGS[command], recipe=recipe, overrides=set_)
    source = f"recipe {recipe}" if recipe else "no recipe"
    typer.echo(f"# unimm {command}: defaults <- {source} <- --set")
    typer.echo(describe(cfg, full=full))
    if problems:
        typer.echo(f"# unimm {command} would refuse it as it is (its own flags may fill these in):")
        typer.echo("\n".join(f"#   - {p}" for p in problems))
