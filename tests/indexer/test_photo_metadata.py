"""Photo metadata from real files written with EXIF: capture time and offset, camera, lens, GPS only when allowed,
orientation, format; bad or missing EXIF gives what can be read, never an error."""

from __future__ import annotations

import calendar
import io

import pytest
from PIL import Image, TiffImagePlugin

from indexer.photo_metadata import PhotoMetadata, read_metadata


def jpeg_with_exif(**tags: object) -> Image.Image:
    exif = Image.Exif()
    details, gps = exif.get_ifd(0x8769), exif.get_ifd(0x8825)
    for name, value in tags.items():
        where, tag = {
            "make": (exif, 0x010F),
            "model": (exif, 0x0110),
            "orientation": (exif, 0x0112),
            "date_time": (exif, 0x0132),
            "original": (details, 0x9003),
            "offset": (details, 0x9011),
            "lens": (details, 0xA434),
            "lat_ref": (gps, 1),
            "lat": (gps, 2),
            "lon_ref": (gps, 3),
            "lon": (gps, 4),
        }[name]
        where[tag] = value
    data = io.BytesIO()
    Image.new("RGB", (64, 48), "tan").save(data, "JPEG", exif=exif)
    return Image.open(io.BytesIO(data.getvalue()))


def rational(*parts: float) -> tuple[TiffImagePlugin.IFDRational, ...]:
    return tuple(TiffImagePlugin.IFDRational(p) for p in parts)


def test_a_camera_photo_gives_its_capture_time_offset_camera_lens_and_orientation() -> None:
    image = jpeg_with_exif(
        make="Canon",
        model="Canon EOS R5",
        orientation=6,
        original="2024:06:01 14:03:59",
        offset="+02:00",
        lens="RF24-105mm F4 L IS USM\x00",
    )
    meta = read_metadata(image)
    assert meta == PhotoMetadata(
        taken_at=calendar.timegm((2024, 6, 1, 14, 3, 59, 0, 0, 0)),
        taken_offset_min=120,
        camera_make="Canon",
        camera_model="Canon EOS R5",
        lens="RF24-105mm F4 L IS USM",
        orientation=6,
        format="jpeg",
    )


def test_gps_is_read_only_when_allowed_south_and_west_negative() -> None:
    image = jpeg_with_exif(lat_ref="S", lat=rational(33, 51, 54), lon_ref="W", lon=rational(151, 12, 36))
    assert read_metadata(image).gps_lat is None and read_metadata(image).gps_lon is None
    meta = read_metadata(image, gps=True)
    assert meta.gps_lat == pytest.approx(-(33 + 51 / 60 + 54 / 3600)) and meta.gps_lon == pytest.approx(-151.21)
    assert meta.without_gps().gps_lat is None


@pytest.mark.parametrize(
    ("tags", "expected_taken"),
    [
        ({"original": "0000:00:00 00:00:00"}, None),
        ({"original": "2024:13:01 10:00:00"}, None),
        ({"original": "garbage"}, None),
        ({"date_time": "2019:12:31 23:59:59"}, calendar.timegm((2019, 12, 31, 23, 59, 59, 0, 0, 0))),
    ],
)
def test_bad_dates_are_unknown_and_the_ifd0_date_is_the_last_resort(
    tags: dict[str, str], expected_taken: int | None
) -> None:
    assert read_metadata(jpeg_with_exif(**tags)).taken_at == expected_taken


def test_out_of_range_values_are_dropped() -> None:
    meta = read_metadata(jpeg_with_exif(orientation=9, offset="+25:00", original="2024:01:01 00:00:00", make="  "))
    assert (meta.orientation, meta.taken_offset_min, meta.camera_make) == (None, None, None)
    gps = read_metadata(
        jpeg_with_exif(lat_ref="N", lat=rational(95, 0, 0), lon_ref="E", lon=rational(10, 0, 0)), gps=True
    )
    assert (gps.gps_lat, gps.gps_lon) == (None, None)


def test_files_without_exif_give_their_format_and_nothing_else() -> None:
    for fmt in ("PNG", "WEBP", "GIF"):
        data = io.BytesIO()
        Image.new("RGB", (8, 8)).save(data, fmt)
        assert read_metadata(Image.open(io.BytesIO(data.getvalue()))) == PhotoMetadata(format=fmt.lower())


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's; the decoder records and logs it
def test_a_corrupt_exif_block_gives_the_format_and_no_error() -> None:
    data = io.BytesIO()
    Image.new("RGB", (8, 8)).save(data, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff garbage")
    meta = read_metadata(Image.open(io.BytesIO(data.getvalue())))
    assert meta.format == "jpeg" and meta.taken_at is None


def test_json_round_trip_and_refusals() -> None:
    meta = PhotoMetadata(taken_at=1, camera_make="Apple", gps_lat=1.5, gps_lon=-2.0, format="heif")
    assert PhotoMetadata.from_json(meta.to_json()) == meta
    with pytest.raises(ValueError, match="unknown"):
        PhotoMetadata.from_json('{"colour": "red"}')
    with pytest.raises(ValueError, match="wrong type"):
        PhotoMetadata.from_json('{"taken_at": "yesterday"}')
    with pytest.raises(ValueError, match="JSON object"):
        PhotoMetadata.from_json("[1]")
