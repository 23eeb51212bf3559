"""How much of the KV transfer layer-wise streaming hides behind the prompt phase.

A token worker runs as its own process (`phasesplit worker --role token`); the prompt worker runs
in this process (the same `WorkerServer` code, so its timings can be read) and serves real
Prefill calls. For a 2048-token prompt on the ~100M `small` checkpoint, per request:

  tail     = token worker acknowledges the whole KV  -  prompt worker finished the prompt phase
             (its last layer and the first token): what the request waits for the KV beyond prefill
  transfer = the whole transfer's time: serialized, the KV moves only after the prompt phase, so
             its tail is the full time to move the same bytes
  exposed  = tail / transfer (serialized: 100% by construction)

layer-wise (each layer sent as soon as its K/V is written) and serialized side by side, in the
same run. Target: exposed <= 10% layer-wise.

    python bench/overlap.py [--model DIR] [--prompt-tokens 2048] [--runs 3] [--device cpu] [--backend grpc|tcp|nccl]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
from types import SimpleNamespace

import grpc

from phasesplit.local.processes import ManagedProcess, free_port, phasesplit_argv, wait_grpc_serving
from phasesplit.roles.server import WorkerServer, load_engine, parse_args as worker_args
from phasesplit.tiny_model import make_tiny_model
from phasesplit.transport.backends import NAMES as KV_BACKENDS, PUSH
from phasesplit.transport.malloc import tune_malloc
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc


def measure(stub, server: WorkerServer, timings: dict, token_worker: str, prompt: list[int], layerwise: bool,
            run: int) -> SimpleNamespace:
    server.core.settings = dataclasses.replace(server.core.settings, layerwise=layerwise)
    rid = f"{'layerwise' if layerwise else 'serialized'}-{run}"
    sampling = pb.SamplingParams(temperature=0, top_p=1, max_tokens=2, ignore_eos=True)
    reply = stub.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling,
                                           token_worker=token_worker), timeout=600)
    t = timings.pop(rid)
    with grpc.insecure_channel(token_worker) as channel:  # no Generate follows: free the KV now
        pb_grpc.WorkerStub(channel).Abort(pb.AbortRequest(request_id=rid), timeout=30)
    return SimpleNamespace(prefill=t.first_token - t.first_layer, tail=t.acknowledged - t.first_token,
                           end_to_end=t.acknowledged - t.arrived, kv_bytes=reply.kv_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: write the `small` preset to a temp dir)")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=PUSH, choices=KV_BACKENDS, help="--kv-backend of both workers")
    args = p.parse_args(argv)
    tune_malloc()
    with tempfile.TemporaryDirectory(prefix="phasesplit-overlap-") as tmp:
        model = args.model or str(make_tiny_model(f"{tmp}/small", seed=0, preset="small"))
        common = ["--model", model, "--served-model-name", "small", "--device", args.device,
                  "--max-model-len", "4096", "--num-kv-blocks", "512", "--max-num-batched-tokens", "4096",
                  "--kv-backend", args.backend, "--no-prefix-caching"]  # every run prefills and sends it all
        port = free_port()
        token = ManagedProcess("token", phasesplit_argv("worker", "--role", "token", *common, "--host", "127.0.0.1",
                                                         "--port", str(port)), pathlib.Path(tmp)).start()
        try:
            wait_grpc_serving(token, f"127.0.0.1:{port}", 300)
            wargs = worker_args(["--role", "prompt", *common, "--host", "127.0.0.1", "--port", "0"])
            server = WorkerServer(load_engine(wargs), wargs)
            timings: dict = {}
            server.prompt.on_timing = lambda rid, t: timings.__setitem__(rid, t)
            server.start()
            prompt = [(7 * i + 3) % 2000 + 4 for i in range(args.prompt_tokens)]
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.PromptWorkerStub(channel)
                measure(stub, server, timings, f"127.0.0.1:{port}", prompt, True, -1)  # warm-up
                results = {True: [], False: []}
                for run in range(args.runs):
                    for layerwise in (True, False):
                        results[layerwise].append(measure(stub, server, timings, f"127.0.0.1:{port}", prompt,
                                                          layerwise, run))
            server.stop()
        finally:
            token.stop(10)
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    def med(rows, name):
        return statistics.median(getattr(r, name) for r in rows)
    transfer = med(results[False], "tail")
    print(f"prompt {args.prompt_tokens} tokens, small preset, {args.runs} runs each, medians, device {args.device}, "
          f"kv backend {args.backend}")
    print(f"KV moved per request: {results[True][0].kv_bytes / 2**20:.1f} MiB; "
          f"whole transfer (serialized): {transfer * 1000:.1f} ms")
    print(f"{'mode':<11} {'prefill s':>10} {'tail ms':>9} {'exposed':>8} {'end-to-end s':>13}")
    for layerwise, name in ((True, "layer-wise"), (False, "serialized")):
        rows = results[layerwise]
        print(f"{name:<11} {med(rows, 'prefill'):>10.3f} {med(rows, 'tail') * 1000:>9.1f} "
              f"{med(rows, 'tail') / transfer:>8.1%} {med(rows, 'end_to_end'):>13.3f}")
    print(f"layer-wise tail / serialized tail: {med(results[True], 'tail') / transfer:.3f}")


if __name__ == "__main__":
    sys.exit(main())
