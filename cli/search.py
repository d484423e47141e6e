"""``search``: rank a gallery features file for query crops or query features → CSV, same-person decision."""

import click

from partreid.cli._common import Command, common_options, emit_output, guard_files, guarded, resolve_device


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  partreid search crops/ --gallery gallery.h5 --checkpoint reid.onnx --out matches.csv
  partreid search q.h5 --gallery g.h5 --threshold 0.9 --out matches.csv --show sheet.png
  partreid search list.txt -g g.h5 -c last.pth --threshold auto --threshold-file threshold.json --out m.csv
  partreid search market1501:/data/Market --split query -g g.h5 -c last.pth --topk 5 --out m.csv
""")
@click.argument("query")
@click.option("--gallery", "-g", required=True, help="Gallery features file (extract-features output).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output CSV: query, rank, gallery, distance, same_person.")
@click.option("--checkpoint", "-c", default=None,
              help="Model for image queries (torch checkpoint or exported .onnx); use the gallery's model.")
@click.option("--split", default=None, help="Split of a dataset-spec QUERY (default as extract-features).")
@click.option("--topk", "-k", type=int, default=10, show_default=True, help="Gallery entries listed per query.")
@click.option("--threshold", default=None,
              help="Same person when distance <= THRESHOLD. 'auto': from --threshold-file, else from the ONNX "
                   "model's metadata.")
@click.option("--threshold-file", type=click.Path(dir_okay=False), default=None,
              help="A `partreid calibrate` result (implies --threshold auto).")
@click.option("--metric", type=click.Choice(["euclidean", "cosine"]), default="euclidean", show_default=True,
              help="Squared Euclidean or cosine distance (as evaluate).")
@click.option("--show", type=click.Path(dir_okay=False), default=None,
              help="Also draw a contact sheet (PNG): query, ranked gallery, distance and decision on each tile.")
@click.option("--show-queries", type=int, default=8, show_default=True, help="Rows of the contact sheet.")
@click.option("--batch-size", "-b", type=int, default=64, show_default=True)
@click.option("--workers", "-j", type=int, default=2, show_default=True)
@common_options
@guarded
def main(query, gallery, out, checkpoint, split, topk, threshold, threshold_file, metric, show, show_queries,
         batch_size, workers, device, seed, verbose, debug):
    """Rank the GALLERY for every query and write the ranked lists as CSV (no pids or cameras needed).

    QUERY is a features file, a folder of crops, a list file (one image path per line) or a dataset spec;
    images are extracted with --checkpoint using the gallery's feature options. With --threshold each row
    carries the same-person decision (distance <= threshold). Prints the CSV path on stdout.
    """
    from partreid.common.errors import InputError
    from partreid.common.h5io import read_features
    from partreid.common.retrieval.gallery_search import (absolute_paths, load_queries, rank_gallery,
                                                           resolve_threshold, save_contact_sheet,
                                                           write_matches_csv)

    if topk < 1:
        raise InputError(f"--topk must be >= 1, got {topk}")
    guard_files(reads={"QUERY": query, "--gallery": gallery, "--checkpoint": checkpoint,
                       "--threshold-file": threshold_file}, specs={"QUERY": query},  # a path or a dataset spec
                writes={"--out": out, "--show": show})
    g = read_features(gallery, parts=False)
    thr = resolve_threshold("auto" if threshold is None and threshold_file else threshold, threshold_file,
                            checkpoint, metric, str(g.attrs.get("model_sha256", "")))
    q = load_queries(query, g, checkpoint=checkpoint, split=split, batch_size=batch_size, workers=workers,
                     device=resolve_device(device) if checkpoint else "cpu")
    if q.feats.shape[1] != g.global_feats.shape[1]:
        raise InputError(f"query features have D={q.feats.shape[1]} but {gallery} has D={g.global_feats.shape[1]}")
    idx, dist = rank_gallery(q.feats, g.global_feats, topk, metric)
    g_paths = absolute_paths(g)
    inputs = (query, gallery, threshold_file, checkpoint)
    path = write_matches_csv(out, q.paths, g_paths, idx, dist, thr, inputs=inputs)
    if thr is not None:
        same = (dist[:, 0] <= thr).sum()
        click.echo(f"{len(q.paths)} queries: {same} with a same-person match at rank 1 (threshold {thr:.4f})",
                   err=True)
    if show:
        sheet = save_contact_sheet(show, q.paths, g_paths, idx, dist, thr, max_queries=show_queries,
                                   inputs=inputs)
        click.echo(f"contact sheet: {sheet}", err=True)
    emit_output(path)
