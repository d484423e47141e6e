"""``calibrate``: a same-person distance threshold at a target false-match rate, from refined pseudo-labels."""

import click

from partreid.cli._common import Command, common_options, emit_output, guard_files, guarded, read_input_path


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  partreid calibrate refined.h5 --fmr 1e-3 --out threshold.json
  ... | refine-labels --out refined.h5 | partreid calibrate --out threshold.json
  partreid evaluate -q q.h5 -g g.h5 --threshold-file threshold.json   # check it on labelled data
  partreid search -q crops/ -g gallery.h5 -c model.onnx --threshold-file threshold.json --out matches.csv
""")
@click.argument("labels", required=False)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output threshold file (.json).")
@click.option("--fmr", type=float, default=None, help="Target false-match rate.  [default: 1e-3]")
@click.option("--min-agreement", type=float, default=None,
              help="Keep clusters whose mean cross-agreement is >= this (0-1). Default: the median cluster.")
@click.option("--min-cluster-size", type=int, default=2, show_default=True, help="Smallest cluster used.")
@click.option("--metric", type=click.Choice(["euclidean", "cosine"]), default="euclidean", show_default=True,
              help="The distance evaluate/search use (squared Euclidean or cosine).")
@click.option("--features", default=None, help="Use this features file instead of the one the labels record.")
@common_options
@guarded
def main(labels, out, fmr, min_agreement, min_cluster_size, metric, features, device, seed, verbose, debug):
    """Estimate the distance threshold (same person when distance <= threshold) at a target false-match rate,
    without labels, from a target set's refined pseudo-labels (refine-labels output).

    Pairs inside one high-agreement cluster count as genuine, pairs across two such clusters as impostors;
    the threshold is the largest one whose FMR on those impostor pairs is <= --fmr. This is an estimate
    resting on the pseudo-labels (merged identities make it loose, split identities make it strict): check
    it with `evaluate --threshold-file` where some labelled data exist. LABELS is read from stdin when
    omitted or '-'. Prints the output path on stdout and a summary on stderr.
    """
    from partreid.common.calibration import DEFAULT_FMR, calibrate_threshold, write_threshold

    labels = read_input_path(labels, "refined labels file")
    guard_files(reads={"LABELS": labels, "--features": features}, writes={"--out": out})
    record = calibrate_threshold(labels, fmr=DEFAULT_FMR if fmr is None else fmr, min_agreement=min_agreement,
                                 min_cluster_size=min_cluster_size, metric=metric, features_path=features)
    path = write_threshold(out, record, inputs=(labels, features, record["features_file"]))
    click.echo(f"threshold {record['threshold']:.6f} ({record['metric']}) at estimated FMR "
               f"{record['estimated_fmr']:.2e} (target {record['target_fmr']:g}), estimated TPR "
               f"{100 * record['estimated_tpr']:.1f}%; {record['clusters_used']}/{record['clusters_total']} "
               f"clusters, {record['num_genuine_pairs']} genuine / {record['num_impostor_pairs']} impostor pairs",
               err=True)
    emit_output(path)
