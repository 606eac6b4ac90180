"""geopera-gateway: a caching XYZ tile and download proxy for the POST-only Geopera API."""

__version__ = "0.1.0"
