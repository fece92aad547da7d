"""Model output -> standard DICOM results (SEG, TID 1500 SR, key images, derived series).

Every builder takes (sources, volume, output, manifest, uid_seed, series_number) and derives
all new UIDs from ``uid_seed``, so re-encoding a job yields identical UIDs.
"""
