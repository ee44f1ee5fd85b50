"""fedmed: federated learning of 3D medical image segmentation across hospitals."""

__version__ = "0.1.0"
