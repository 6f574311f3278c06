"""Every table the pipeline writes, its columns named once.

Batches are Hive-partitioned (`batches/server_name=HOST/partition_id=N/*.parquet`): the two
partition keys live in the folder names, not in the files, as DuckDB, PyArrow and pandas expect.
"""

from __future__ import annotations

import pyarrow as pa


# One row to download: what prep hands to fetch, and the provenance fetch carries into its output.
BATCH = pa.schema(
    [
        ("uuid", pa.string()),
        ("source_id", pa.string()),  # gbifID, the id column, or the row's line number
        ("identifier", pa.string()),  # the normalised URL
        ("is_license_full", pa.bool_()),  # license, source and title all present
        ("license", pa.string()),
        ("source", pa.string()),
        ("title", pa.string()),
    ]
)

# Added to the batch rows when earlier downloads are given (`--previous`): where an earlier
# download stored the URL's image (its batch folder and the row's uuid there), or the error
# it ended with; null for the rows to fetch.
REUSE = [
    ("reuse_from", pa.string()),
    ("reuse_uuid", pa.string()),
    ("reuse_error_code", pa.string()),
    ("reuse_error_msg", pa.string()),
    ("reuse_http_status", pa.int32()),
]
REUSE_NAMES = tuple(name for name, _ in REUSE)

# Rows prep could not use: `prep/rejected.parquet`.
REJECTED = pa.schema(
    [
        ("source_file", pa.string()),
        ("row_number", pa.int64()),  # line number in a text file, row number in a Parquet file
        ("raw_value", pa.string()),  # the URL as written, or the whole line when it did not parse
        ("reason", pa.string()),  # a RejectReason
    ]
)

# Rows the GBIF filter left out on purpose: `prep/dropped.parquet`, to see what a filter removed.
DROPPED = pa.schema(
    [
        ("source_file", pa.string()),
        ("row_number", pa.int64()),
        ("identifier", pa.string()),  # the URL as written
        ("reason", pa.string()),  # a DropReason
        ("value", pa.string()),  # what the filter read: the row's type, format or gbifID
    ]
)

# Rows whose URL another row downloads: `prep/duplicates.parquet`, so no occurrence loses its image.
DUPLICATES_EXTRA = [("server_name", pa.string()), ("carrier_uuid", pa.string())]

# One row per server: `prep/servers.parquet`.
SERVERS = pa.schema(
    [
        ("server_name", pa.string()),
        ("rows", pa.int64()),
        ("batches", pa.int64()),
        ("reused_rows", pa.int64()),  # rows an earlier download already holds (--previous)
    ]
)

# Overlap with earlier downloads, in distinct URLs by server: `prep/overlap.parquet`.
OVERLAP = pa.schema(
    [
        ("server_name", pa.string()),
        ("new", pa.int64()),  # in no earlier snapshot
        ("reused", pa.int64()),  # stored by an earlier download: not requested
        ("carried_errors", pa.int64()),  # failed for good earlier (404, ...): not requested
        ("fetched_again", pa.int64()),  # earlier: a retryable error, or never fetched
        ("gone", pa.int64()),  # in an earlier snapshot, not in this one (link rot)
    ]
)

# Downloaded images: `downloaded_images/server_name=HOST/partition_id=N/successes-*.parquet`.
SIZE = pa.list_(pa.int32(), 2)  # [height, width]
SUCCESSES = BATCH.append(pa.field("original_size", SIZE)) \
    .append(pa.field("resized_size", SIZE)) \
    .append(pa.field("hashsum_original", pa.string())) \
    .append(pa.field("hashsum_resized", pa.string())) \
    .append(pa.field("image", pa.binary())) \
    .append(pa.field("image_format", pa.string())) \
    .append(pa.field("linked_from", pa.string())) \
    .append(pa.field("linked_uuid", pa.string()))
# linked_from / linked_uuid: set on a row reused by link (`--previous-mode link`); its image is
# not in this download but in the earlier one's batch folder `linked_from`, under `linked_uuid`.

# URLs without an image: `downloaded_images/.../errors-*.parquet`.
ERRORS = pa.schema(
    [
        ("uuid", pa.string()),
        ("identifier", pa.string()),
        ("retry_count", pa.int32()),  # attempts made
        ("error_code", pa.string()),  # an ErrorCode
        ("error_msg", pa.string()),
        ("http_status", pa.int32()),  # the last HTTP status, when there was one
    ]
)

# Prep's own scratch table: the rows that passed, in input order, before UUIDs and batching;
# `server_id` numbers the servers in the order they first appear (an integer sorts faster).
STAGING_EXTRA = [("row_index", pa.int64()), ("server_name", pa.string()),
                 ("server_id", pa.int32())]


def with_kept_columns(schema: pa.Schema, keep_columns: list[str]) -> pa.Schema:
    """A schema plus the input columns the user asked to carry along (as strings)."""
    for name in keep_columns:
        schema = schema.append(pa.field(name, pa.string()))
    return schema


def batch_schema(keep_columns: list[str], reuse: bool = False) -> pa.Schema:
    schema = with_kept_columns(BATCH, keep_columns)
    for name, type_ in REUSE if reuse else []:
        schema = schema.append(pa.field(name, type_))
    return schema


def duplicates_schema(keep_columns: list[str]) -> pa.Schema:
    schema = batch_schema(keep_columns)
    for name, type_ in DUPLICATES_EXTRA:
        schema = schema.append(pa.field(name, type_))
    return schema


def successes_schema(keep_columns: list[str]) -> pa.Schema:
    return with_kept_columns(SUCCESSES, keep_columns)


def staging_schema(keep_columns: list[str]) -> pa.Schema:
    schema = pa.schema([field for field in BATCH if field.name != "uuid"])
    for name, type_ in STAGING_EXTRA:
        schema = schema.append(pa.field(name, type_))
    return with_kept_columns(schema, keep_columns)
