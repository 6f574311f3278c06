"""distributed-downloader: polite, resumable, cluster-wide image downloads from URL lists."""

__version__ = "0.1.0"
