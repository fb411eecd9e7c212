"""A home-console tool plugin as its authors wrote it: one class in main.py, pydantic 2.

Its neighbour, legacy_sensor, pins pydantic 1. In one shared environment the two could
not both be installed; under plugd each has its own virtualenv.
"""

import pydantic
from pydantic import BaseModel


class Forecast(BaseModel):
    city: str
    celsius: float

    @property
    def fahrenheit(self) -> float:
        return self.celsius * 9 / 5 + 32


class WeatherPlugin:
    id = "weather"
    name = "Weather"
    version = "2.1.0"

    async def on_load(self):
        self.cache = {}

    def forecast(self, request: dict) -> dict:
        f = Forecast.model_validate(request)  # pydantic 2's API
        return {"city": f.city, "fahrenheit": f.fahrenheit}

    def pydantic_version(self) -> str:
        return pydantic.VERSION
