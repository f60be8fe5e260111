"""The upload proxy: token check, target lookup and a streaming reverse proxy."""
