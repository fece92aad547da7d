"""dicom-ai-node: a DICOM node that brings deep learning into the imaging workflow."""

__version__ = "0.1.0"
