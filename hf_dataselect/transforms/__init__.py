"""``datasets.map``-compatible transforms that attach columns to rows.

Each transform is a small dataclass of configuration. Models are loaded lazily on the first call and are not
part of the pickled state, so ``datasets`` fingerprints a transform by its configuration alone and a second
identical ``.map`` is a cache hit (see :class:`hf_dataselect.transforms.base.MapTransform`).
"""

from hf_dataselect.transforms.base import MapTransform

__all__ = ["MapTransform"]
