"""The trace store (schema "vaedyn.trace", version 2; reads version 1): Zarr v3, readable by plain xarray.

The store owns every read and write of its groups: `schema` (what it holds), `metadata` (the
commit point), `writer` (the background TraceWriter, whole stores and groups), `reader` (checks,
the committed root group, events), `classification` (the group `vaedyn classify` writes) and
`info` (`vaedyn store info`). This package re-exports their public names.
"""

from vaedyn_cli.store.classification import read_classification, write_classification
from vaedyn_cli.store.info import info_table, store_info, verify_store
from vaedyn_cli.store.metadata import consolidate
from vaedyn_cli.store.reader import check_store, open_trace, read_events, resolve_store_path, stored_config
from vaedyn_cli.store.schema import (
    CHANNEL_COORDS,
    CHANNEL_VARS,
    CLASSIFICATION_GROUP,
    EVENT_FIELDS,
    EVENTS_GROUP,
    LOCK_FILE,
    OPTIONAL_CHANNEL_VARS,
    PARAM_VARS,
    READABLE_VERSIONS,
    SCALAR_VARS,
    SCHEMA,
    SCHEMA_VERSION,
    STEP_VARS,
    ZARR_JSON,
    ChannelLayout,
    PendingRecord,
    TraceRecord,
    records_to_dataset,
    store_attrs,
)
from vaedyn_cli.store.writer import TraceWriter, write_records

__all__ = [
    "CHANNEL_COORDS",
    "CHANNEL_VARS",
    "CLASSIFICATION_GROUP",
    "EVENTS_GROUP",
    "EVENT_FIELDS",
    "LOCK_FILE",
    "OPTIONAL_CHANNEL_VARS",
    "PARAM_VARS",
    "READABLE_VERSIONS",
    "SCALAR_VARS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STEP_VARS",
    "ZARR_JSON",
    "ChannelLayout",
    "PendingRecord",
    "TraceRecord",
    "TraceWriter",
    "check_store",
    "consolidate",
    "info_table",
    "open_trace",
    "read_classification",
    "read_events",
    "records_to_dataset",
    "resolve_store_path",
    "store_attrs",
    "store_info",
    "stored_config",
    "verify_store",
    "write_classification",
    "write_records",
]
