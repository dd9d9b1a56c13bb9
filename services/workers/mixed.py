"""Both phases in one process (Splitwise's mixed pool): prefill through the batcher, KV handed over in memory."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from services.contracts.errors import DeadlineExceeded
from services.grpcutil import request_id
from services.rpc.tandem.v1 import worker_pb2 as pb
from services.workers.client import PrefillResult, sampling_from_pb
from services.workers.decode import DecodeWorker
from services.workers.prefill import PrefillBatcher, PrefillJob


def result_to_pb(r: PrefillResult) -> pb.PrefillResponse:
    t = r.timings
    return pb.PrefillResponse(request_id=r.request_id, first_token=r.first_token, handle=r.handle,
                              prompt_tokens=r.prompt_tokens, finish_reason=r.finished or "", kv_bytes=r.kv_bytes,
                              kv_path=r.kv_path,
                              timings=pb.PhaseTimings(queue_s=t.queue_s, prefill_s=t.prefill_s,
                                                      kv_transfer_s=t.kv_transfer_s))


def wait_result(job: PrefillJob, context: grpc.ServicerContext) -> PrefillResult:
    """The job's result within the caller's deadline (the job's own KV push has its own deadline)."""
    remaining = context.time_remaining()
    try:
        return job.future.result(timeout=remaining)
    except TimeoutError:
        raise DeadlineExceeded(f"prefill of request {job.request_id} did not finish within the deadline") from None


class MixedWorker:
    """Generate = local prefill (no KV push) + the local decode scheduler, streamed as one call."""

    def __init__(self, batcher: PrefillBatcher, decoder: DecodeWorker) -> None:
        self.batcher, self.decoder = batcher, decoder

    def generate(self, req: pb.MixedRequest, context: grpc.ServicerContext) -> Iterator[pb.MixedEvent]:
        rid = req.request_id or request_id(context)
        params = sampling_from_pb(req.sampling)
        job = PrefillJob(rid, list(req.prompt_ids), params, decode_address=None)
        self.batcher.submit(job)
        result = wait_result(job, context)
        yield pb.MixedEvent(prefill=result_to_pb(result))
        if result.finished:
            return
        layers, job.layers = job.layers, None
        for ev in self.decoder.stream(rid, f"{rid}/{id(job):x}", layers, result.first_token, params, context):
            yield pb.MixedEvent(token=ev)
