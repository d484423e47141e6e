"""``finetune``: not built yet."""

import click

from cli._common import common_options, guarded, not_implemented


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@guarded
def main(device, seed, verbose, debug):
    """Not implemented yet."""
    not_implemented("finetune")
