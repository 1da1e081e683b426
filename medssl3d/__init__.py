"""medssl3d: anatomy-aware 3D self-supervised pretraining for CT/MRI, built on MONAI."""

__version__ = "0.1.0"
