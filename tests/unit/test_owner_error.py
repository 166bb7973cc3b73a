"""NotOwner crosses the wire with its owner: convert.trailers_of (server) and convert.error_from (client) are inverse.

The round trip runs twice: through the two functions, and over a real gRPC call (a bare grpc server that aborts
with trailers_of's metadata, as service/interceptors.py does), so an owner the wire cannot carry ("" included)
would show. A client that does not know the reason still gets FailedPrecondition and the message.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from memory_service import errors
from memory_service.wire import convert

OWNERS = ["10.0.0.7:50051", "", "[::1]:6000", "node-b.example:443"]


@pytest.mark.parametrize("owner", OWNERS)
def test_round_trip_keeps_class_message_and_owner(owner):
    exc = errors.NotOwner(f"stream 'cam0' is owned by {owner or 'no node'}", owner=owner)
    trailers = convert.trailers_of(exc)
    assert dict(trailers) == {convert.ERROR_REASON_KEY: "NOT_OWNER", convert.OWNER_KEY: owner}
    back = convert.error_from(convert.status_of(exc), str(exc), trailers)
    assert type(back) is errors.NotOwner
    assert back.owner == owner and str(back) == str(exc)
    assert convert.status_of(exc) == grpc.StatusCode.FAILED_PRECONDITION


def test_other_refined_errors_carry_no_owner():
    trailers = convert.trailers_of(errors.StaleLayout("layout changed"))
    assert trailers == ((convert.ERROR_REASON_KEY, "STALE_LAYOUT"),)
    assert convert.trailers_of(errors.FailedPrecondition("plain")) == ()
    assert type(convert.error_from(grpc.StatusCode.FAILED_PRECONDITION, "x", trailers)) is errors.StaleLayout


def test_a_client_that_does_not_know_the_reason_gets_failed_precondition():
    exc = errors.NotOwner("stream 'cam0' is owned by 10.0.0.7:50051", owner="10.0.0.7:50051")
    trailers = convert.trailers_of(exc)
    unknown = tuple((k, "SOME_FUTURE_REASON" if k == convert.ERROR_REASON_KEY else v) for k, v in trailers)
    back = convert.error_from(grpc.StatusCode.FAILED_PRECONDITION, str(exc), unknown)
    assert type(back) is errors.FailedPrecondition and str(back) == str(exc)
    # the reason alone (an older server: no owner entry) still refines, with owner "" (send it elsewhere)
    reason_only = ((convert.ERROR_REASON_KEY, "NOT_OWNER"),)
    back = convert.error_from(grpc.StatusCode.FAILED_PRECONDITION, "moved", reason_only)
    assert type(back) is errors.NotOwner and back.owner == ""
    # a reason that does not refine the status code's class is ignored, never a wrong class
    assert type(convert.error_from(grpc.StatusCode.NOT_FOUND, "gone", trailers)) is errors.NotFound


@pytest.fixture
def aborting_server():
    """A bare gRPC server whose one method aborts with the status and trailers of the exception it is given."""
    raised: list[BaseException] = []

    def behavior(request, context):
        exc = raised[0]
        context.set_trailing_metadata(convert.trailers_of(exc))
        context.abort(convert.status_of(exc), str(exc))

    handler = grpc.method_handlers_generic_handler(
        "test.Owner", {"Call": grpc.unary_unary_rpc_method_handler(behavior)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/test.Owner/Call")

    def run(exc: BaseException) -> Exception:
        raised[:] = [exc]
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=10)
        rpc = info.value
        return convert.error_from(rpc.code(), rpc.details(), rpc.trailing_metadata())

    yield run
    channel.close()
    server.stop(0)


@pytest.mark.parametrize("owner", OWNERS)
def test_owner_survives_a_real_grpc_call(aborting_server, owner):
    back = aborting_server(errors.NotOwner("not mine", owner=owner))
    assert type(back) is errors.NotOwner and back.owner == owner and str(back) == "not mine"
