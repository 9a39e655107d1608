"""One error hierarchy, mapped once per transport: every error of the domain has exactly one
gRPC status and one HTTP problem. (Which package may import what is checked by the
import-linter contracts in pyproject.toml, run by `make lint`.)"""

from __future__ import annotations


def test_every_domain_error_has_a_grpc_status() -> None:
    from billing_core.errors import ALL_ERRORS, QuotaError
    from quota_service.errors import STATUS_FOR

    def subclasses(cls: type[QuotaError]) -> set[type[QuotaError]]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    assert subclasses(QuotaError) == set(ALL_ERRORS)
    assert set(STATUS_FOR) == set(ALL_ERRORS)


def test_every_domain_error_has_one_http_problem() -> None:
    from billing_core.errors import ALL_ERRORS
    from control_plane.api.problems import STATUS_FOR as HTTP_FOR

    assert set(HTTP_FOR) == set(ALL_ERRORS)
    for cls in ALL_ERRORS:
        status, slug, title = HTTP_FOR[cls]
        assert 400 <= status < 600 and slug and title


def test_grpc_details_stay_short_enough_for_a_header() -> None:
    from billing_core.errors import InvalidRequest
    from quota_service.errors import MAX_DETAILS, details_for

    short = InvalidRequest("resource 'x' is unknown")
    assert details_for(short) == short.message
    long = InvalidRequest("resource " + repr("y" * 20_000) + " is unknown")
    cut = details_for(long)
    assert len(cut) == MAX_DETAILS and cut.endswith("…") and cut.startswith("resource 'yyy")
