"""MONAI's bundle metadata schema, shipped so that validation never downloads.

``monai.bundle.verify_metadata`` downloads the schema that ``metadata.json`` names unless a
file is already at the path it is given; nothing in fedmed may download at run time, so
:data:`META_SCHEMA` is a verbatim copy of ``meta_schema_20240725.json`` (MONAI-extra-test-data
release 0.8.1, Apache-2.0, the schema current MONAI bundles name) and :func:`write_schema`
puts it where ``verify_metadata`` looks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)

_STR: dict[str, Any] = {"type": "string"}
_OBJ: dict[str, Any] = {"type": "object"}


def _described(kind: dict[str, Any], text: str) -> dict[str, Any]:
    return {"description": text, **kind}


_TENSOR: dict[str, Any] = {
    "$comment": "Represents a tensor object argument/return value, can be MetaTensor.",
    "type": "object",
    "properties": {
        "type": _STR,
        "format": _STR,
        "num_channels": {"type": "integer"},
        "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}},
        "dtype": _STR,
        "value_range": {"type": "array", "items": {"type": "number"}},
        "is_patch_data": {"type": "boolean"},
        "channel_def": _OBJ,
    },
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
}

_NETWORK_IO: dict[str, Any] = {
    "description": (
        "Defines the format, shape, and meaning of inputs, outputs (and optionally "
        "post-processed outputs) to the model."
    ),
    "type": "object",
    "$comment": (
        "Arguments/return values described by pattern property, order considered significant."
    ),
    "properties": {
        "inputs": {"type": "object", "patternProperties": {"^.+$": {"$ref": "#/$defs/argument"}}},
        "outputs": {"type": "object", "patternProperties": {"^.+$": {"$ref": "#/$defs/result"}}},
        "post_processed_outputs": {
            "$comment": "Return value format after post-processing, not needed if not changed.",
            "type": "object",
            "patternProperties": {"^.+$": {"$ref": "#/$defs/result"}},
        },
    },
    "required": ["inputs", "outputs"],
}

META_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2019-09/schema",
    "$defs": {
        "tensor": _TENSOR,
        "argument": {
            "$comment": (
                "Acceptable input types for model forward pass, arbitrary Python objects not "
                "covered."
            ),
            "anyOf": [
                {"type": "number"},
                {"type": "integer"},
                {"type": "string"},
                {"type": "boolean"},
                {"$ref": "#/$defs/tensor"},
            ],
        },
        "result": {
            "$comment": "Return value from a model's forward pass, same as an argument for now.",
            "$ref": "#/$defs/argument",
        },
        "network_io": _NETWORK_IO,
    },
    "type": "object",
    "properties": {
        "schema": _described(_STR, "URL of the schema file."),
        "version": _described(_STR, "Version number of the bundle."),
        "changelog": _described(
            _OBJ, "Dictionary relating previous version names to strings describing the version."
        ),
        "monai_version": _described(_STR, "Version of MONAI the bundle was generated with."),
        "pytorch_version": _described(_STR, "Version of PyTorch the bundle was generated with."),
        "numpy_version": _described(_STR, "Version of NumPy the bundle was generated with."),
        "required_packages_version": _described(
            _OBJ,
            "Dictionary relating required package names to their versions. The bundle requires "
            "these packages to operate which are additional to the base requirements for MONAI.",
        ),
        "task": _described(_STR, "Plain-language description of what the bundle is meant to do."),
        "description": _described(
            _STR, "Longer form description of what the bundle is, what it does, etc."
        ),
        "authors": _described(_STR, "State author(s) of the bundle."),
        "copyright": _described(_STR, "State copyright of the bundle."),
        "data_source": _described(
            _STR, "Where to download or prepare the data used in this bundle."
        ),
        "data_type": _described(_STR, "Type of the data, like: `dicom`, `nibabel`, etc."),
        "image_classes": _described(_STR, "Description for every class of the input tensors."),
        "label_classes": _described(
            _STR, "Description for every class of the input tensors if present."
        ),
        "pred_classes": _described(
            _STR, "Description for every class of the output prediction(s)."
        ),
        "eval_metrics": _described(
            _OBJ, "Dictionary relating evaluation metrics to the achieved scores."
        ),
        "intended_use": _described(
            _STR, "What the bundle is to be used for, ie. what task it accomplishes."
        ),
        "references": _described(
            {"type": "array", "items": _STR},
            "List of published referenced relating to the bundle.",
        ),
        "supported_apps": _described(_OBJ, "List of supported applications, eg. 'monai-label'"),
        "network_data_format": {"$ref": "#/$defs/network_io"},
    },
    "$comment": (
        "This permits definitions for multiple networks with format <network-name>_data_format"
    ),
    "patternProperties": {"^[_a-zA-Z0-9]+_data_format$": {"$ref": "#/$defs/network_io"}},
    "required": [
        "schema",
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
}


def write_schema(path: Path) -> Path:
    """Write :data:`META_SCHEMA` as JSON to ``path``; returns it."""
    path.write_text(json.dumps(META_SCHEMA, indent=4) + "\n")
    return path
