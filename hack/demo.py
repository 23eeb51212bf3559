"""`make demo` (`python hack/demo.py`): the tiny model served in local mode.

Writes the tiny random model into a cache directory, starts `manifests/examples/tiny-cpu.yaml` in
local mode (a router, a prompt worker and a token worker), asks a few questions with the official
`openai` client, streaming and not, prints the answers and the token usage, and stops everything.
The model's weights are random: the answers are gibberish, the plumbing is real."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import openai

from phasesplit.local.processes import phasesplit_argv
from phasesplit.tiny_model import make_tiny_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "manifests" / "examples" / "tiny-cpu.yaml"
ENDPOINT = re.compile(r"OpenAI endpoint (http://\S+)")


def model_dir() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "phasesplit"
    path = cache / "models" / "tiny"
    if not (path / "model.safetensors").exists():
        print(f"writing the tiny model to {path}")
        make_tiny_model(path, seed=0, preset="tiny")
    return path


def start_local(model: pathlib.Path, log_dir: str) -> tuple[subprocess.Popen, str]:
    argv = phasesplit_argv("local", str(MANIFEST), "--model", str(model), "--port", "0", "--log-dir", log_dir)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        print(f"  | {line.rstrip()}")
        if match := ENDPOINT.search(line):
            return proc, match.group(1)
    raise RuntimeError(f"local mode exited with code {proc.wait()} before it was ready (logs in {log_dir})")


def ask(client: openai.OpenAI) -> None:
    print("\n== completion")
    reply = client.completions.create(model="tiny", prompt="The prompt phase and the token phase",
                                      max_tokens=24, temperature=0)
    print(f"text: {reply.choices[0].text!r}\nusage: {reply.usage.model_dump(exclude_none=True)}")

    print("\n== completion, streaming")
    pieces = []
    for chunk in client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24,
                                           temperature=0.8, seed=1, stream=True,
                                           stream_options={"include_usage": True}):
        pieces += [c.text for c in chunk.choices]
        if chunk.usage:
            print(f"text: {''.join(pieces)!r}\nusage: {chunk.usage.model_dump(exclude_none=True)}")

    messages = [{"role": "user", "content": "What does a token worker do?"}]
    print("\n== chat")
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    print(f"assistant: {reply.choices[0].message.content!r}\nusage: {reply.usage.model_dump(exclude_none=True)}")

    print("\n== chat, streaming")
    pieces = []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        pieces += [c.delta.content or "" for c in chunk.choices]
        if chunk.usage:
            print(f"assistant: {''.join(pieces)!r}\nusage: {chunk.usage.model_dump(exclude_none=True)}")


def main() -> int:
    model = model_dir()
    with tempfile.TemporaryDirectory(prefix="phasesplit-demo-") as log_dir:
        print(f"starting local mode on {MANIFEST.relative_to(ROOT)}")
        started = time.monotonic()
        proc, endpoint = start_local(model, log_dir)
        try:
            print(f"ready in {time.monotonic() - started:.1f} s at {endpoint}")
            with openai.OpenAI(base_url=endpoint, api_key="unused", max_retries=0, timeout=60) as client:
                ask(client)
        finally:
            print("\nstopping")
            proc.send_signal(signal.SIGTERM)
            for line in proc.stdout:
                print(f"  | {line.rstrip()}")
            code = proc.wait()
    return code


if __name__ == "__main__":
    sys.exit(main())
