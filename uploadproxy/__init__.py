"""The upload proxy: token check, target lookup and a streaming reverse proxy."""

from uploadproxy.app import create_app
from uploadproxy.resolver import NotReadyYet, NotUploadTarget, Resolver, UploadTarget

__all__ = ["NotReadyYet", "NotUploadTarget", "Resolver", "UploadTarget", "create_app"]
