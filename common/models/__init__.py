"""Backbones shared by both stages (see notes in each module).

Import the concrete modules directly, e.g. ``from common.models.vit import PartViT``; this package file stays
import-free so that importing one backbone never pulls in the others.
"""
