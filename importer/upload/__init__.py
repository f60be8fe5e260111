"""The upload server's parts: settings, request bodies, resume state, HTTP server.

The entry point and the documented contract are in ``importer.uploadserver``;
the data reaches the volume through ``importer.sources.upload`` and the same
processor, formats, writer and qemu-img code as an import.
"""
