"""Series -> Volume (pixels + patient geometry) and back."""

from dicom_ai_node.imaging.volume import Volume, VolumeError

__all__ = ["Volume", "VolumeError"]
