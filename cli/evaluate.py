"""``evaluate``: mAP, CMC rank-k and mINP of query features against gallery features."""

import json

import click

from partreid.cli._common import common_options, emit_output, guarded, read_input_path, resolve_device, seed_everything
from partreid.cli.extract_features import parse_size
from partreid.common.models.archs import ARCHS


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  evaluate --query q.h5 --gallery g.h5
  evaluate --query q.h5 --gallery g.h5 --rerank --out metrics.json
  evaluate --checkpoint finetune/last.pth --data market1501:/data/Market-1501-v15.09.15
  extract-features -c ckpt.pth -d market1501:/data/M --split query --out q.h5 | evaluate --gallery g.h5
  evaluate --query q.h5 --gallery g.h5 --show-ranks 8 --out-dir ranks/
""")
@click.option("--query", "-q", default=None, help="Query features file (read from stdin when omitted).")
@click.option("--gallery", "-g", default=None, help="Gallery features file.")
@click.option("--checkpoint", "-c", default=None, help="Instead of files: a model to extract both splits with.")
@click.option("--data", "-d", "spec", default=None, help="With --checkpoint: the dataset spec (query + gallery).")
@click.option("--rerank", is_flag=True, help="k-reciprocal re-ranking (Zhong et al. 2017).")
@click.option("--k1", type=int, default=20, show_default=True)
@click.option("--k2", type=int, default=6, show_default=True)
@click.option("--lambda", "lambda_value", type=float, default=0.3, show_default=True)
@click.option("--protocol", type=click.Choice(["market", "cuhk03"]), default="market", show_default=True,
              help="market: drop same-pid same-camera gallery entries; cuhk03: single-gallery-shot CMC.")
@click.option("--metric", type=click.Choice(["euclidean", "cosine"]), default="euclidean", show_default=True,
              help="Squared Euclidean (the peers' convention) or cosine distance.")
@click.option("--fusion", type=click.Choice(["auto", "cls", "cat", "mean"]), default="auto", show_default=True,
              help="With --checkpoint: global feature of a ViT.")
@click.option("--neck", type=click.Choice(["after", "before"]), default="after", show_default=True)
@click.option("--flip/--no-flip", default=False, show_default=True)
@click.option("--arch", type=click.Choice(list(ARCHS)), default=None, help="With --checkpoint: force the architecture.")
@click.option("--image-size", default=None, help="HxW pixels.")
@click.option("--batch-size", "-b", type=int, default=64, show_default=True)
@click.option("--workers", "-j", type=int, default=2, show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics as JSON; the table then goes to stderr and the JSON path to stdout.")
@click.option("--show-ranks", type=int, default=0, help="Write ranked-list pictures of the first N queries.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for ranked-list pictures (and, with --checkpoint, the features files).")
@common_options
@guarded
def main(query, gallery, checkpoint, spec, rerank, k1, k2, lambda_value, protocol, metric, fusion, neck, flip, arch,
         image_size, batch_size, workers, out, show_ranks, out_dir, device, seed, verbose, debug):
    """Evaluate re-ID retrieval: mAP, CMC rank-1/5/10/20 and mINP (Market protocol by default).

    Takes --query/--gallery features files, or --checkpoint with --data to extract both splits itself.
    Distances and rankings are processed in chunks of queries, so memory stays bounded. Without --out the
    table is printed on stdout.
    """
    from partreid.cli._stages import evaluate_checkpoint, evaluate_files, format_metrics_table
    from partreid.common.errors import InputError
    from partreid.common.fileio import atomic_path

    seed_everything(seed, torch=bool(checkpoint))  # torch only when a network runs
    kwargs = dict(rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value, protocol=protocol, metric=metric,
                  show_ranks=show_ranks)
    if checkpoint:
        if not spec:
            raise InputError("--checkpoint needs --data SPEC (a dataset with query and gallery splits)")
        metrics = evaluate_checkpoint(checkpoint, spec, fusion=fusion, neck=neck, flip=flip, arch=arch,
                                      image_size=parse_size(image_size), batch_size=batch_size, workers=workers,
                                      device=resolve_device(device), out_dir=out_dir, **kwargs)
    else:
        if not gallery:
            raise InputError("give --gallery G.h5 (and --query Q.h5 or its path on stdin), or --checkpoint/--data")
        metrics = evaluate_files(read_input_path(query, "query features file"), gallery, out_dir=out_dir, **kwargs)
    table = format_metrics_table(metrics)
    if out:
        with atomic_path(out, inputs=(query, gallery)) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        click.echo(table, err=True)
        emit_output(out)
    else:
        click.echo(table)
    if metrics.get("ranked_lists"):
        click.echo(f"ranked lists: {len(metrics['ranked_lists'])} pictures in {out_dir}", err=True)
