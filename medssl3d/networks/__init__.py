"""Backbones with one token interface (3D Swin, 3D ViT), heads and decoders."""

from medssl3d.networks.backbones import BACKBONES, Backbone, BackboneOutput, SwinBackbone, ViTBackbone, build_backbone

__all__ = ["BACKBONES", "Backbone", "BackboneOutput", "SwinBackbone", "ViTBackbone", "build_backbone"]
