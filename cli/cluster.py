"""``cluster``: k-reciprocal Jaccard distance + DBSCAN pseudo-labels from a features file."""

import click

from partreid.cli._common import common_options, emit_output, guarded, read_input_path


def parse_sweep(value):
    """'0.4:0.7:0.05' → [0.4, 0.45, ..., 0.7]."""
    if value is None:
        return None
    try:
        lo, hi, step = (float(v) for v in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected START:STOP:STEP, e.g. 0.4:0.7:0.05") from None
    if step <= 0 or hi < lo:
        raise click.BadParameter(f"{value!r}: need STOP >= START and STEP > 0")
    count = int(round((hi - lo) / step)) + 1
    return [round(lo + i * step, 10) for i in range(count)]


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  cluster train.h5 --out labels.h5                       # PPLR/cluster-contrast defaults
  cluster train.h5 --out labels.h5 --eps 0.5 --sweep-eps 0.4:0.7:0.05
  extract-features -c ckpt.pth -d msmt17:/data/MSMT17_V1 --out f.h5 | cluster --out l.h5 | refine-labels --out r.h5
  cluster big.h5 --out l.h5 --knn approximate            # hundreds of thousands of images
""")
@click.argument("features", required=False)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output labels file (.h5, or .csv for a readable export).")
@click.option("--k1", type=int, default=30, show_default=True, help="k-reciprocal neighbourhood size.")
@click.option("--k2", type=int, default=6, show_default=True, help="Local query expansion size.")
@click.option("--eps", type=float, default=0.6, show_default=True, help="DBSCAN radius on the Jaccard distance.")
@click.option("--min-samples", type=int, default=4, show_default=True, help="DBSCAN min_samples.")
@click.option("--convention", type=click.Choice(["reference", "textbook"]), default="reference", show_default=True,
              help="reference: the forward list holds k1 entries including self, as in the code behind the "
                   "published numbers; textbook: k1+1 entries (Zhong et al. 2017).")
@click.option("--knn", "knn_method", type=click.Choice(["exact", "approximate"]), default="exact",
              show_default=True, help="Exact faiss search, or HNSW for very large sets.")
@click.option("--sweep-eps", default=None, help="START:STOP:STEP: print the clustering table for every eps "
                                               "(one distance graph reused); labels are written for --eps.")
@click.option("--plot-clusters", type=click.Path(dir_okay=False), default=None,
              help="Draw one row of crops per discovered identity (PNG), to judge the clusters by eye.")
@common_options
@guarded
def main(features, out, k1, k2, eps, min_samples, convention, knn_method, sweep_eps, plot_clusters, device, seed,
         verbose, debug):
    """Cluster FEATURES (a features file; path from stdin when omitted or '-') into pseudo-labels.

    Writes a labels file (outliers = -1, plus the kNN lists for refine-labels) and prints its path on
    stdout. The report (clusters, outliers, size histogram, and NMI/ARI/pairwise P/R/F when the features
    file has real pids) goes to stderr.
    """
    from partreid.pplr_finetune.pseudo_labels import cluster_features_file

    path, report = cluster_features_file(read_input_path(features, "features file"), out, k1=k1, k2=k2, eps=eps,
                                         min_samples=min_samples, convention=convention, knn=knn_method,
                                         sweep=parse_sweep(sweep_eps), device=device)
    click.echo(report, err=True)
    if plot_clusters:
        from partreid.cli._stages import plot_clusters_file

        click.echo(f"clusters picture: {plot_clusters_file(path, plot_clusters)}", err=True)
    emit_output(path)
