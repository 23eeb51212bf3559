"""GPU check: the engine against transformers on the GPU, then split serving on the GPU (gRPC, and
NCCL where two GPUs exist). Run through bench/gpu_check.sh; nothing is downloaded.

    python bench/gpu_check.py [--device cuda] [--quick] [--out DIR]

--device cpu --quick runs every part on a tiny model on the CPU (the NCCL part then runs its
gloo code path), to check the script itself where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import torch

from phasesplit import tiny_model

REPO = Path(__file__).resolve().parent.parent
BIG = dict(vocab_size=2048, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,  # ~1B parameters
           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def make_model(out: Path, quick: bool) -> Path:
    tiny_model.PRESETS.setdefault("gpu-1b", BIG)
    preset = "tiny" if quick else "gpu-1b"
    started = time.perf_counter()
    path = tiny_model.make_tiny_model(out / preset, seed=0, preset=preset)
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        params = sum(torch.Size(f.get_slice(name).get_shape()).numel() for name in f.keys())
    print(f"random checkpoint {preset}: {params / 1e6:,.1f} M parameters, written in {time.perf_counter() - started:.0f} s")
    return path


def check_logits(model_dir: Path, device: str, dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    from phasesplit.engine.loader import load_model
    from phasesplit.engine.model import dense_causal_attention

    torch_dtype = getattr(torch, dtype)
    ids = torch.randint(4, 2000 if "1b" in str(model_dir) else 500, (256,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
        expected = hf(ids[None].to(device)).logits[0].float()
        del hf
        _, model = load_model(model_dir, dtype=dtype, device=device)
        hidden = model(ids.to(device), torch.arange(256, device=device), dense_causal_attention())
        logits = model.compute_logits(hidden).float()
        del model
    diff = (logits - expected).abs().max().item()
    agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    tolerance = 1e-3 if dtype == "float32" else 0.1
    print(f"logits vs transformers ({dtype}, {device}): max |diff| {diff:.2e} (tolerance {tolerance:g}), "
          f"argmax agreement {agree:.1%} -> {'OK' if diff <= tolerance else 'FAIL'}")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def throughput(model_dir: Path, device: str, dtype: str, quick: bool) -> None:
    argv = [sys.executable, str(REPO / "bench" / "engine.py"), "--model", str(model_dir), "--device", device,
            "--dtype", dtype, "--requests", "8" if quick else "48", "--batch-size", "4" if quick else "16"]
    subprocess.run(argv, check=True, timeout=240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(model_dir: Path, log_dir: Path, role: str, device: str, dtype: str, *extra: str):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    log = open(log_dir / f"{role}-{port}.log", "wb")
    argv = [sys.executable, "-m", "phasesplit.roles.server", "--role", role, "--model", str(model_dir),
            "--served-model-name", "check", "--host", "127.0.0.1", "--port", str(port), "--device", device,
            "--dtype", dtype, "--kv-memory-fraction", "0.3", *extra]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{role} worker exited; see {log.name}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, addr
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{role} worker not serving after 180 s; see {log.name}")
            time.sleep(0.5)


def greedy(max_tokens: int):
    from phasesplit.v1 import worker_pb2 as pb
    return pb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, ignore_eos=True)


def split_generate(prompt: str, token: str, rid: str, ids: list[int], n: int):
    import grpc

    from phasesplit.v1 import worker_pb2 as pb
    from phasesplit.v1 import worker_pb2_grpc as pb_grpc
    with grpc.insecure_channel(prompt) as pc, grpc.insecure_channel(token) as tc:
        reply = pb_grpc.PromptWorkerStub(pc).Prefill(pb.PrefillRequest(
            request_id=rid, prompt_token_ids=ids, sampling=greedy(n), token_worker=token), timeout=120)
        tokens = [reply.first_token]
        for event in pb_grpc.TokenWorkerStub(tc).Generate(pb.GenerateRequest(
                request_id=rid, sampling=greedy(n), first_token=reply.first_token), timeout=120):
            tokens += list(event.token_ids)
    return tokens, reply


def mixed_generate(addr: str, rid: str, ids: list[int], n: int) -> list[int]:
    import grpc

    from phasesplit.v1 import worker_pb2 as pb
    from phasesplit.v1 import worker_pb2_grpc as pb_grpc
    with grpc.insecure_channel(addr) as channel:
        return [t for e in pb_grpc.TokenWorkerStub(channel).Generate(pb.GenerateRequest(
            request_id=rid, sampling=greedy(n), prompt_token_ids=ids), timeout=120) for t in e.token_ids]


def tensor_parallel(model_dir: Path, log_dir: Path, device: str, quick: bool) -> None:
    """A mixed worker over 2 ranks (cuda:0 and cuda:1 with NCCL; gloo on CPU) against one rank, float32:
    greedy tokens must match; tokens/s of both for the same concurrent requests."""
    import concurrent.futures

    one, one_addr = start_worker(model_dir, log_dir, "mixed", device, "float32")
    two, two_addr = start_worker(model_dir, log_dir, "mixed", device, "float32", "--tensor-parallel", "2")
    try:
        n, requests = (8, 4) if quick else (64, 16)
        prompts = [[(7 * i + j) % 500 + 3 for j in range(16 + 8 * i)] for i in range(requests)]
        rates = {}
        for name, addr in (("1 rank", one_addr), ("2 ranks", two_addr)):
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(requests) as pool:
                outs = list(pool.map(lambda i: mixed_generate(addr, f"tp-{i}", prompts[i], n), range(requests)))
            rates[name] = (outs, requests * n / (time.perf_counter() - start))
        same = sum(a == b for a, b in zip(rates["1 rank"][0], rates["2 ranks"][0]))
        print(f"greedy float32: {same}/{requests} requests token-for-token equal between 1 and 2 ranks")
        print(f"tokens/s ({requests} concurrent requests of {n} tokens): 1 rank {rates['1 rank'][1]:.1f}, "
              f"2 ranks {rates['2 ranks'][1]:.1f} (ratio {rates['2 ranks'][1] / rates['1 rank'][1]:.2f})")
    finally:
        for proc in (one, two):
            proc.terminate()
            proc.wait(30)


def split_serving(model_dir: Path, log_dir: Path, backend: str, devices: tuple[str, str, str], dtype: str,
                  quick: bool) -> None:
    """Prompt worker on devices[0], token on devices[1], mixed reference on devices[2]."""
    extra = ("--kv-backend", backend)
    with futures.ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(start_worker, model_dir, log_dir, "prompt", devices[0], dtype, *extra),
                pool.submit(start_worker, model_dir, log_dir, "token", devices[1], dtype, *extra),
                pool.submit(start_worker, model_dir, log_dir, "mixed", devices[2], dtype)]
    procs = [j.result() for j in jobs if j.exception() is None]
    try:
        (_, prompt), (_, token), (_, mixed) = [j.result() for j in jobs]
        gen = torch.Generator().manual_seed(5)
        vocab = 500 if quick else 2000
        short = [torch.randint(4, vocab, (int(n),), generator=gen).tolist()
                 for n in torch.randint(8, 200, (8 if quick else 16,), generator=gen)]
        with futures.ThreadPoolExecutor(8) as pool:
            split = list(pool.map(lambda i: split_generate(prompt, token, f"s{i}", short[i], 16)[0], range(len(short))))
            ref = list(pool.map(lambda i: mixed_generate(mixed, f"m{i}", short[i], 16), range(len(short))))
        same = sum(a == b for a, b in zip(split, ref))
        print(f"{backend}: split vs mixed, {len(short)} concurrent greedy requests: {same}/{len(short)} identical "
              f"-> {'OK' if same == len(short) else 'FAIL'}")
        long_len = 512 if quick else 3072
        total_bytes = total_s = 0.0
        for i in range(3 if quick else 6):
            ids = torch.randint(4, vocab, (long_len,), generator=gen).tolist()
            _, reply = split_generate(prompt, token, f"long{i}", ids, 2)
            if i:  # the first one warms up (and forms the process group)
                total_bytes += reply.kv_bytes
                total_s += reply.transfer_seconds
        print(f"{backend}: KV of {long_len}-token prompts: {total_bytes / 1e9:.3f} GB in {total_s:.3f} s of transfer "
              f"-> {total_bytes / max(total_s, 1e-9) / 1e9:.2f} GB/s (layer-wise: includes waiting for the prefill)")
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny model, few requests")
    p.add_argument("--dtype", help="default: bfloat16 on cuda, float32 elsewhere")
    p.add_argument("--out", help="where to write the checkpoint and logs (default: a temporary directory)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing checked on a GPU")
        return 1
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    out = Path(args.out or tempfile.mkdtemp(prefix="phasesplit-gpu-check-"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if cuda else 0
    print(f"torch {torch.__version__}; device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)}, {gpus} GPU(s))" if cuda else "") + f"; dtype {dtype}")

    section("checkpoint")
    model_dir = make_model(out, args.quick)
    section("engine logits vs transformers")
    check_logits(model_dir, args.device, dtype)
    section("engine tokens/s vs transformers generate")
    throughput(model_dir, args.device, dtype, args.quick)
    section("split serving, gRPC KV backend")
    split_serving(model_dir, out / "logs", "grpc", (args.device,) * 3, dtype, args.quick)
    section("split serving, NCCL KV backend")
    if not cuda:
        split_serving(model_dir, out / "logs", "nccl", (args.device,) * 3, dtype, args.quick)
        print("(on CPU the nccl backend runs its gloo code path; NCCL itself was not exercised)")
    elif gpus >= 2:
        split_serving(model_dir, out / "logs", "nccl", ("cuda:0", "cuda:1", "cuda:0"), dtype, args.quick)
    else:
        print(f"NOT RUN: the NCCL backend needs two GPUs (NCCL refuses two ranks on one GPU); found {gpus}.")
    section("tensor parallelism, 2 ranks")
    if not cuda:
        tensor_parallel(model_dir, out / "logs", args.device, args.quick)
        print("(on CPU the ranks talk over gloo: this checks correctness, not speed; NCCL was not exercised)")
    elif gpus >= 2:
        tensor_parallel(model_dir, out / "logs", "cuda", args.quick)
    else:
        print(f"NOT RUN: tensor parallelism needs two GPUs (one rank per GPU); found {gpus}.")
    print(f"\nlogs: {out / 'logs'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
