"""`bench serve --peer llama.cpp`: the same requests against llama-server on the same GGUF file, and the
ratios between the two sides.

The peer runs after tokenforge's run (and after a --server-cmd server has stopped), so the two never share
the CPU. llama-server gets `--peer-slots` parallel sequences with continuous batching, `--peer-threads`
threads, a free port and a context in which every slot holds the longest request. The requests, the rate,
the concurrency cap and the client (`serve.run_once`) are tokenforge's own, so one piece of code measures
both sides. Any failure of the peer (no binary, no GGUF file, a start-up error, a failed warm-up request)
comes back as an error line naming its log, never as an exception, and tokenforge's figures still stand.

The ratios read "> 1: tokenforge is better": output tok/s is tokenforge / llama.cpp, median TTFT and median
TPOT are llama.cpp / tokenforge.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from pathlib import Path

from tokenforge.bench.cli import DEFAULT_LLAMA_CPP_BIN, add_peer_args_option  # one spelling for every peer
from tokenforge.bench.llamacpp import LlamaServer, tool_version
from tokenforge.bench.serve import ServeRequest, run_once, table

CTX_ROUND = 256  # a slot's context is the longest request rounded up to a multiple of this


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def add_peer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", choices=("llama.cpp",),
                   help="after tokenforge's run, start llama-server on the same GGUF file, send it the very same "
                   "requests, stop it, and print both sides with their ratios (single runs of random, "
                   "shared-prefix or sharegpt)")
    p.add_argument("--peer-bin", default=DEFAULT_LLAMA_CPP_BIN,
                   help=f"folder with llama.cpp's llama-server (default {DEFAULT_LLAMA_CPP_BIN})")
    p.add_argument("--peer-model", metavar="FILE.gguf",
                   help="the GGUF file llama-server loads (default: the one --tokenizer or --model names)")
    p.add_argument("--peer-threads", type=_positive, default=2, help="llama-server -t THREADS (default 2)")
    p.add_argument("--peer-slots", type=_positive, default=16,
                   help="llama-server -np SLOTS: sequences decoded together, continuous batching on (default 16)")
    add_peer_args_option(p, "llama-server")


def peer_gguf(args: argparse.Namespace) -> str:
    """--peer-model, or the GGUF file that --tokenizer or --model names; ValueError when there is none."""
    if args.peer_model:
        if not Path(args.peer_model).is_file():
            raise ValueError(f"--peer-model {args.peer_model}: no such file")
        return args.peer_model
    from tokenforge.config import ConfigError  # finding the file takes the engine's modules (and torch)
    from tokenforge.models.gguf_file import find_gguf

    path = args.tokenizer or args.model
    try:
        found = find_gguf(path)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if found is None:
        raise ValueError(f"{path} is neither a GGUF file nor a folder holding one; pass --peer-model FILE.gguf")
    return str(found)


def ctx_per_slot(requests: list[ServeRequest]) -> int:
    """Tokens each llama-server slot needs: the longest prompt + output, with room to spare."""
    longest = max(len(r.prompt) + r.output_len for r in requests)
    return -(-(longest + 1) // CTX_ROUND) * CTX_ROUND


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_llama_server(args: argparse.Namespace, requests: list[ServeRequest]) -> dict:
    """llama-server's figures for `requests` at --request-rate, as `run_once` reports them, plus what was run;
    {"error": ...} in their place when the peer could not be run."""
    peer = {"name": "llama.cpp", "version": tool_version(args.peer_bin, "llama-server"),
            "slots": args.peer_slots, "threads": args.peer_threads, "args": args.peer_args}
    try:
        model = peer_gguf(args)
        server = LlamaServer(args.peer_bin, model, args.peer_threads, free_port(), slots=args.peer_slots,
                             ctx_per_slot=ctx_per_slot(requests), extra_args=args.peer_args)
    except (OSError, ValueError) as e:
        return {**peer, "error": str(e)}
    peer |= {"model_file": model, "ctx_per_slot": ctx_per_slot(requests), "log_path": server.log_path}
    peer_args = argparse.Namespace(**{**vars(args), "base_url": server.base_url, "api_key": None})
    try:
        with server:
            figures = asyncio.run(run_once(peer_args, requests, args.request_rate))
    except (OSError, RuntimeError, SystemExit) as e:
        # it exited at start-up, was not ready in time (TimeoutError is an OSError), or failed run_once's
        # warm-up request (SystemExit): the peer's failure, not the benchmark's
        return {**peer, "error": str(e)}
    return {**peer, **figures}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def peer_ratios(ours: dict, peer: dict) -> dict:
    """Each ratio > 1 when tokenforge is better; None where a side has no figure (a failed peer)."""
    if "error" in peer:
        return {"peer_output_tok_s_ratio": None, "peer_ttft_p50_ratio": None, "peer_tpot_p50_ratio": None}
    return {"peer_output_tok_s_ratio": _ratio(ours["output_tok_s"], peer["output_tok_s"]),
            "peer_ttft_p50_ratio": _ratio(peer["ttft_ms"]["median"], ours["ttft_ms"]["median"]),
            "peer_tpot_p50_ratio": _ratio(peer["tpot_ms"]["median"], ours["tpot_ms"]["median"])}


def peer_lines(peer: dict, ratios: dict, dataset: str) -> list[str]:
    extra = "".join(f" {a}" for a in peer.get("args", []))
    where = (f"llama-server -np {peer['slots']} -t {peer['threads']}{extra} "
             f"({peer['version'] or 'version unknown'})")
    log = f" (log: {peer['log_path']})" if peer.get("log_path") else ""
    if "error" in peer:
        return ["", f"peer llama.cpp: error: {peer['error']}{log}"]

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    return ["", table(peer, f"peer llama.cpp  server={where}  model={peer['model_file']}  dataset={dataset}"),
            f"llama-server log: {peer['log_path']}", "",
            f"tokenforge vs llama.cpp (> 1: tokenforge is better): output tok/s "
            f"{shown(ratios['peer_output_tok_s_ratio'])} (tokenforge / llama.cpp), median TTFT "
            f"{shown(ratios['peer_ttft_p50_ratio'])} and median TPOT {shown(ratios['peer_tpot_p50_ratio'])} "
            f"(llama.cpp / tokenforge)"]


def compare_with_peer(args: argparse.Namespace, requests: list[ServeRequest], ours: dict) -> tuple[dict, list[str]]:
    """Run the peer on `requests`; returns what the JSON report gains ("peer" and the ratios) and the lines
    the text report gains."""
    peer = run_llama_server(args, requests)
    ratios = peer_ratios(ours, peer)
    return {"peer": peer, **ratios}, peer_lines(peer, ratios, args.dataset)
