"""``partreid``: one command that runs every PartReID command (``partreid cluster ...`` = ``cluster ...``).

Sub-commands are imported only when they run, so ``partreid --help`` and a command that needs no network stay
fast. A new command is one entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib

import click

from partreid.cli._common import Group
from partreid.common import __version__

# command name → (module under partreid.cli holding a click command called ``main``, one-line summary)
COMMANDS = {
    "pass-pretrain": ("pass_pretrain", "PASS part-aware self-supervised pre-training of a ViT (and export)."),
    "extract-features": ("extract_features", "Global and part features of a dataset split → features file."),
    "cluster": ("cluster", "k-reciprocal Jaccard distance + DBSCAN → pseudo-labels file."),
    "refine-labels": ("refine_labels", "PPLR cross-agreement of each part → refined labels file."),
    "finetune": ("finetune", "PPLR unsupervised fine-tuning (PGLR + AALS), re-clustering every epoch."),
    "evaluate": ("evaluate", "mAP, CMC rank-k and mINP of query against gallery features."),
    "inspect-data": ("inspect_data", "Summarise a dataset spec, a features/labels file or a run folder."),
    "export": ("export", "A checkpoint → ONNX or TorchScript, verified against torch on real crops."),
    "search": ("search", "Rank a gallery for query crops or features → CSV (+ contact sheet), same-person decision."),
    "calibrate": ("calibrate", "Same-person distance threshold at a target FMR, from refined pseudo-labels."),
}


class LazyGroup(Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"partreid.cli.{COMMANDS[name][0]}")
        return module.main

    def format_commands(self, ctx, formatter):
        rows = [(name, summary) for name, (_, summary) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  partreid pass-pretrain --data LUPerson --arch vit_small --out runs/pass
  partreid extract-features -c backbone.pth -d market1501:/data/Market --out f.h5 | partreid cluster --out l.h5
  partreid cluster --help
Each command is also installed on its own (cluster, evaluate, ...).
""")
@click.version_option(__version__, prog_name="partreid")
def main():
    """PartReID: PASS pre-training and PPLR unsupervised fine-tuning for person re-ID, as composable commands."""
