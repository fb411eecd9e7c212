"""A home-console tool plugin written against pydantic 1 (``parse_obj``, ``.dict()``)."""

import pydantic
from pydantic import BaseModel


class Reading(BaseModel):
    sensor: str
    value: float


class LegacySensorPlugin:
    id = "legacy_sensor"
    name = "Legacy Sensor"
    version = "0.9.4"

    def reading(self, raw: dict) -> dict:
        r = Reading.parse_obj(raw)  # pydantic 1's API
        return r.dict()

    def pydantic_version(self) -> str:
        return pydantic.VERSION
