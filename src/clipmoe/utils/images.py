"""Image file extensions, one list for every reader (datasets, evaluation sets, the search index)."""

from __future__ import annotations

# Lower-case, without the dot, in preference order when one sample has several (webdataset, img2dataset).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "pgm", "tif", "tiff")


def is_image_file(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False
