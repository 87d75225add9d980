"""Response body of ``GET /api/facets``: the values the served generation's images have for the filters that take
names (folder, camera, format), with how many images have each, and the span of their capture times. Folders, which
a large library has tens of thousands of, come a page at a time (:class:`FolderQuery`); cameras and formats whole."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_FOLDER_LIMIT = 200  # folders one response lists unless asked for another number
MAX_FOLDER_LIMIT = 1000


@dataclass(frozen=True)
class FolderQuery:
    """Which folders a facets response lists: those whose path starts with ``prefix`` (ignoring case and a leading
    "/"), in path order, after the path ``after`` (exclusive; None: from the first), ``limit`` at most."""

    prefix: str = ""
    after: str | None = None
    limit: int = DEFAULT_FOLDER_LIMIT


class FacetValue(BaseModel):
    """A value a filter can take, and how many images of the generation match it."""

    value: str
    images: int = Field(description="images that match it (for a folder: those in it and in its subfolders)")


class CaptureTimes(BaseModel):
    """The earliest and latest capture times of the generation's images (the clock form of `taken_at`)."""

    earliest: str = Field(description="YYYY-MM-DDTHH:MM:SS")
    latest: str = Field(description="YYYY-MM-DDTHH:MM:SS")
    from_exif: int = Field(description="images whose capture time came from EXIF (the others: the file's mtime)")


class Facets(BaseModel):
    """What the served generation holds, to choose filters from: the values a folder, camera or format filter can
    name that match at least one image (every camera and format; the folders asked for). A filter naming a value
    outside these is refused (422)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "generation": "g-000003",
                "images": 12873,
                "folders": [{"value": "2023", "images": 1200}, {"value": "2023/Holidays", "images": 310}],
                "folders_matched": 2,
                "folders_truncated": False,
                "cameras": [{"value": "Apple iPhone 12", "images": 9800}, {"value": "Canon EOS R5", "images": 2100}],
                "formats": [{"value": "jpeg", "images": 12400}, {"value": "heif", "images": 473}],
                "taken": {"earliest": "2009-07-14T09:12:03", "latest": "2024-06-01T14:03:59", "from_exif": 12011},
            }
        }
    )

    generation: str = Field(description="the index generation described")
    images: int = Field(description="images in the generation")
    folders: list[FacetValue] = Field(
        description="folders relative to the image root that hold images, directly or in subfolders, whose path "
        "starts with `folder_prefix` (ignoring case), in path order after `folder_after`, `limit` at most"
    )
    folders_matched: int = Field(description="folders whose path starts with `folder_prefix`, in all")
    folders_truncated: bool = Field(
        description="more such folders follow the last one listed: ask again with `folder_after` set to its path"
    )
    cameras: list[FacetValue] = Field(description='every camera, as "make model", most images first')
    formats: list[FacetValue] = Field(description="every file format, most images first")
    taken: CaptureTimes | None = Field(description="the span of capture times; null when the generation is empty")
