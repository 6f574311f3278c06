"""The rows a batch writes: a success (the image and its facts) or an error (a code, a message)."""

from __future__ import annotations

from typing import Any

from distributed_downloader.errors import ErrorCode
from distributed_downloader.images import StoredImage

# What a reused row takes from the earlier download's row (the rest is this input's).
REUSED_COLUMNS = ("original_size", "resized_size", "hashsum_original", "hashsum_resized",
                  "image_format")


def error_row(row: dict[str, Any], code: ErrorCode, message: str, attempts: int,
              http_status: int | None = None) -> dict[str, Any]:
    return {"uuid": row["uuid"], "identifier": row["identifier"], "retry_count": attempts,
            "error_code": str(code), "error_msg": message[:1000], "http_status": http_status}


def success_row(row: dict[str, Any], image: StoredImage) -> dict[str, Any]:
    return {
        **row,
        "original_size": list(image.original_size),
        "resized_size": list(image.resized_size),
        "hashsum_original": image.hashsum_original,
        "hashsum_resized": image.hashsum_resized,
        "image": image.image,
        "image_format": image.image_format,
    }


def reused_row(row: dict[str, Any], before: dict[str, Any], folder: str, uuid: str,
               copy: bool) -> dict[str, Any]:
    """A row stored by an earlier download (`--previous`): its image copied, or linked to."""
    return {
        **row, **{name: before[name] for name in REUSED_COLUMNS},
        "image": before["image"] if copy else None,
        "linked_from": None if copy else folder, "linked_uuid": None if copy else uuid,
    }
