"""Response body of ``GET /api/facets``: the values the served generation's images have for the filters that take
names (folder, camera, format), with how many images have each, and the span of their capture times."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
    """What the served generation holds, to choose filters from: every value a folder, camera or format filter can
    name that matches at least one image. A filter naming a value outside these is refused (422)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "generation": "g-000003",
                "images": 12873,
                "folders": [{"value": "2023", "images": 1200}, {"value": "2023/Holidays", "images": 310}],
                "cameras": [{"value": "Apple iPhone 12", "images": 9800}, {"value": "Canon EOS R5", "images": 2100}],
                "formats": [{"value": "jpeg", "images": 12400}, {"value": "heif", "images": 473}],
                "taken": {"earliest": "2009-07-14T09:12:03", "latest": "2024-06-01T14:03:59", "from_exif": 12011},
            }
        }
    )

    generation: str = Field(description="the index generation described")
    images: int = Field(description="images in the generation")
    folders: list[FacetValue] = Field(
        description="folders relative to the image root that hold images, directly or in subfolders, in path order"
    )
    cameras: list[FacetValue] = Field(description='cameras as "make model", most images first')
    formats: list[FacetValue] = Field(description="file formats, most images first")
    taken: CaptureTimes | None = Field(description="the span of capture times; null when the generation is empty")
