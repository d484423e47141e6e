"""``inspect-data``: print a readable summary of a dataset spec, a features file or a labels file."""

import click

from partreid.cli._common import common_options, guarded, read_input_path


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  inspect-data market1501:/data/Market-1501-v15.09.15
  inspect-data runs/query.h5
  inspect-data labels.h5
  extract-features --checkpoint ckpt.pth --data folder:crops --out f.h5 | inspect-data
""")
@click.argument("target", required=False)
@common_options
@guarded
def main(target, device, seed, verbose, debug):
    """Summarise TARGET: counts, shapes, attributes, and the cluster-size histogram of a labels file.

    TARGET is a dataset spec (market1501:ROOT, msmt17:ROOT, cuhk03np:ROOT, dukemtmc:ROOT, folder:ROOT,
    csv:FILE, luperson:ROOT or a bare NAME under $REID_DATA), a features file or a labels file. When omitted
    or '-', the path is read from stdin. The summary itself is this command's output (stdout).
    """
    from partreid.cli._inspect import describe

    click.echo(describe(read_input_path(target, "dataset spec or file")))
