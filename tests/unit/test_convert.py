"""Wire conversions of the sidecar that are written by hand for speed stay exact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from quota_service import convert

ZONES = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))]
)


@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    ZONES,
)
def test_timestamps_match_protobufs_own_conversion(at: datetime, zone: timezone | None) -> None:
    at = at.replace(tzinfo=zone)
    expected = Timestamp()
    expected.FromDatetime(at)
    assert convert._ts(at) == expected


def test_no_timestamp_for_no_datetime() -> None:
    assert convert._ts(None) is None
