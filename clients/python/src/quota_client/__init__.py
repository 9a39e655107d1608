"""Clients for the quota sidecar (quota.v1.QuotaService): sync and asyncio, typed.

from quota_client import QuotaClient, FailureMode
with QuotaClient("127.0.0.1:50051") as quota:
    decision = quota.check_and_consume("acme", "tokens", 1200)
"""

from quota.v1 import quota_service_pb2 as pb

from quota_client._async import AsyncQuotaClient, AsyncReservation
from quota_client._messages import FailureMode, QuotaUnavailable, Tokens
from quota_client._spool import SpoolStatus
from quota_client._sync import QuotaClient, Reservation

__all__ = [
    "AsyncQuotaClient",
    "AsyncReservation",
    "FailureMode",
    "QuotaClient",
    "QuotaUnavailable",
    "Reservation",
    "SpoolStatus",
    "Tokens",
    "pb",
]
