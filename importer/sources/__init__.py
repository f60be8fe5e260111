"""Data sources, chosen by IMPORTER_SOURCE: each module's ``open`` builds one."""

from __future__ import annotations

from importer import errors
from importer.processor import Source
from importer.progress import Progress
from importer.settings import Settings


def open_source(settings: Settings, progress: Progress) -> Source:
    if settings.source == "http":
        from importer.sources import http

        return http.open(settings, progress=progress)
    if settings.source == "registry" and settings.pull_method == "node":
        from importer.sources import imagevolume

        return imagevolume.open(settings, progress=progress)
    if settings.source == "registry":
        from importer.sources import registry

        return registry.open(settings, progress=progress)
    if settings.source == "s3":
        from importer.sources import s3

        return s3.open(settings, progress=progress)
    if settings.source == "none":
        from importer.sources import blank

        return blank.open(settings, progress=progress)
    raise errors.SettingsError(variable="IMPORTER_SOURCE",
                               reason=f"Unknown data source: {settings.source}")
