"""dicom-ai-node: a DICOM node that brings deep learning into the imaging workflow."""

import pydicom.config

__version__ = "0.1.0"

# Be liberal in what we store: a value whose length does not fit its VR (a private FD holding
# 4 bytes, as Philips CTs send) is read as UN bytes instead of raising BytesLengthException,
# in every process (node, receivers, workers). The file keeps the bytes as received; results
# leave such values out (results/conform.py).
pydicom.config.convert_wrong_length_to_UN = True
