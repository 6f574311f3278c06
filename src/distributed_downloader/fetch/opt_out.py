"""The hosts' opt-out: `X-Robots-Tag` directives asking that an image not be used (noai, ...).

A value is a comma-separated list of directives, each either for every crawler (`noai`) or for
one (`otherbot: noai`); only those for every crawler and those naming this tool count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PRODUCT_TOKEN = "distributed-downloader"


def opted_out(headers: Mapping[str, str] | None, directives: Iterable[str]) -> str | None:
    """The X-Robots-Tag value that opts this image out, or None."""
    if not headers:
        return None
    wanted = {directive.lower() for directive in directives}
    getall = getattr(headers, "getall", None)
    values = getall("X-Robots-Tag", []) if getall else [headers.get("X-Robots-Tag", "")]
    for value in values:
        agent = None
        for part in value.split(","):
            directive = part.strip().lower()
            if ":" in directive:  # "bot: noai, noindex": the bot named for what follows
                agent, _, directive = (piece.strip() for piece in directive.partition(":"))
            if agent not in (None, "*", PRODUCT_TOKEN):
                continue
            if directive in wanted:
                return value
    return None
