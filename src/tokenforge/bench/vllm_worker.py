"""Runs one throughput workload through vLLM's offline `LLM.generate` and prints one JSON line.

Standalone on purpose: it is executed by the peer's own Python (which has vLLM, not tokenforge), so it
imports nothing from tokenforge. Only the `generate` call is timed; vLLM start-up, compilation and a
tiny warm-up request are excluded, as for the other sides.

    PEER_PYTHON -I vllm_worker.py SPEC.json
SPEC.json: {"model", "dtype", "max_model_len", "threads", "seed", "prompt_token_ids", "output_lens"}
"""

import json
import os
import sys
import time

RESULT_KEY = "peer_tok_s"


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    # vLLM's CPU backend sizes its OpenMP pool from this binding, not from torch.set_num_threads.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{spec['threads'] - 1}"
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              seed=spec["seed"])

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7, 8])], greedy(4), use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompt_token_ids"]]
    params = [greedy(n) for n in spec["output_lens"]]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    got = [len(o.outputs[0].token_ids) for o in outs]
    if got != spec["output_lens"]:
        raise SystemExit(f"vLLM returned output lengths {got}, asked for {spec['output_lens']}")
    num_output_tokens = sum(spec["output_lens"])
    print(json.dumps({"peer": "vllm", "version": vllm.__version__, RESULT_KEY: num_output_tokens / elapsed,
                      "elapsed_s": elapsed, "num_output_tokens": num_output_tokens}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
