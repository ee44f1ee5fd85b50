"""A trained model and its masks in the formats hospitals' and researchers' tools read.

- :mod:`fedmed.export.bundle`: ``fedmed export bundle``, a MONAI Bundle of a run's model
  (its runtime steps in :mod:`fedmed.export.steps`, its metadata in
  :mod:`fedmed.export.bundle_meta`, MONAI's metadata schema in :mod:`fedmed.export.schema`);
- :mod:`fedmed.export.dicom_seg`: ``fedmed predict --format dicom-seg``, DICOM Segmentation
  objects that reference their source series (segment codes in :mod:`fedmed.export.codes`).

Submodules are imported where used: the bundle needs MONAI, the SEG highdicom.
"""
