"""``refine-labels``: PPLR cross-agreement scores of each part against the global feature."""

import click

from partreid.cli._common import common_options, emit_output, guarded, read_input_path


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  refine-labels labels.h5 --out refined.h5
  refine-labels labels.h5 --out refined.h5 --k 20 --plot agreement.png
  ... | cluster --out labels.h5 | refine-labels --out refined.h5
""")
@click.argument("labels", required=False)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output labels file with `agreement`.")
@click.option("--k", type=int, default=20, show_default=True, help="Neighbours per set (self excluded).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write per-part agreement histograms (PNG).")
@common_options
@guarded
def main(labels, out, k, plot, device, seed, verbose, debug):
    """Score each part of every image by its cross-agreement with the global feature (PPLR Eq. 1).

    C_i(g, p_n) = |R_i(g) ∩ R_i(p_n)| / |R_i(g) ∪ R_i(p_n)|, with R_i the top-k neighbour sets in the global and
    part-n feature spaces. The features are found through the labels file's reference (the content hash must
    match). LABELS is read from stdin when omitted or '-'. Prints the output path on stdout.
    """
    from partreid.pplr_finetune.cross_agreement import refine_labels_file

    path, report = refine_labels_file(read_input_path(labels, "labels file"), out, k=k, device=device)
    click.echo(report, err=True)
    if plot:
        from partreid.cli._plots import plot_agreement
        from partreid.common.h5io import read_labels

        click.echo(f"histograms: {plot_agreement(read_labels(path).agreement, plot)}", err=True)
    emit_output(path)
