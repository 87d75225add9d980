"""What the served generation holds for the filters that take names: folders, cameras, formats, capture times."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ReadAccess, ServiceDep
from ..facet_schemas import Facets
from ..strict_json import StrictJSONRoute
from ._common import errors

router = APIRouter(route_class=StrictJSONRoute, prefix="/api/facets", tags=["search"], dependencies=[ReadAccess])


@router.get("", response_model=Facets, responses=errors(401, 503), summary="Filter values")
def facets(service: ServiceDep) -> Facets:
    """The folders, cameras and formats the served index generation's images have, with how many images match each,
    and the span of their capture times: the values the search and duplicates filters accept (another folder, camera
    or format is a 422). Found once per generation.

    Example: `GET /api/facets`, then `GET /api/search?q=beach&folder=2023/Holidays&camera=iphone`
    """
    return service.facets()
