"""Train tokenforge's built-in demo model on this machine's CPU.

The corpus is the Python standard library's own source (every machine with Python has it), minus its test
suites. Files are split into train and validation by a hash of their path, so the validation loss measures
code the model never saw. The script trains a byte-level BPE tokenizer with the `tokenizers` library, then a
small Llama-architecture model with `transformers` (a dev dependency; the engine never imports it), and writes
a complete Hugging Face checkpoint with a model card:

    .venv/bin/python scripts/train_demo_model.py --out src/tokenforge/demo_model

Defaults fit in under an hour on 2 cores. `--steps 20 --out /tmp/x` is a quick smoke run.

With `--distill-from TEACHER` it trains a small draft model for speculative decoding instead: the teacher's
tokenizer is reused (a draft must share it), and the student learns the teacher's next-token distributions
(forward KL on the teacher's logits, mixed with a little plain cross-entropy) on the same training files:

    .venv/bin/python scripts/train_demo_model.py --distill-from src/tokenforge/demo_model \\
        --out src/tokenforge/demo_draft_model --layers 2 --hidden-size 192 --intermediate-size 512 \\
        --heads 3 --kv-heads 1 --steps 700
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the format most small chat models use; the system turn is optional.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SAMPLE_PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef read_lines(path):"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write the checkpoint into")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--context", type=int, default=1024, help="max_position_embeddings of the saved model")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill-from", type=Path, default=None,
                   help="teacher checkpoint: train a draft model on its distributions, with its tokenizer")
    p.add_argument("--distill-alpha", type=float, default=0.9,
                   help="weight of the KL-to-teacher term; the rest goes to cross-entropy on the data")
    return p.parse_args(argv)


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    return root, files


def is_validation(rel_path: str, fraction: float) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < fraction


def load_corpus(val_fraction: float) -> tuple[list[str], list[str], dict]:
    root, files = stdlib_files()
    train, val, val_names = [], [], []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = str(path.relative_to(root))
        if is_validation(rel, val_fraction):
            val.append(text)
            val_names.append(rel)
        else:
            train.append(text)
    info = {"root": str(root), "python": platform.python_version(), "train_files": len(train),
            "val_file_names": val_names,
            "val_files": len(val), "train_bytes": sum(map(len, train)), "val_bytes": sum(map(len, val))}
    return train, val, info


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    """One token stream, files separated by <|endoftext|> so the model learns where a file ends."""
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def make_model(args, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    eot = tok.token_to_id("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        intermediate_size=args.intermediate_size, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.context, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
    )
    return LlamaForCausalLM(config)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, rng: random.Random):
    top = len(stream) - seq_len - 1
    while True:
        starts = [rng.randrange(top) for _ in range(batch_size)]
        yield torch.stack([stream[s:s + seq_len + 1] for s in starts])


def fixed_val_batches(stream: torch.Tensor, seq_len: int, count: int, batch_size: int) -> list[torch.Tensor]:
    """Evenly spaced windows, the same at every evaluation, so the curve is not noise."""
    windows = (len(stream) - 1) // (seq_len + 1)
    picks = [round(i * (windows - 1) / max(count * batch_size - 1, 1)) for i in range(count * batch_size)]
    rows = [stream[p * (seq_len + 1):(p + 1) * (seq_len + 1)] for p in picks]
    return [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def evaluate(model, val: list[torch.Tensor]) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in val]
    model.train()
    return sum(losses) / len(losses)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_teacher(path: Path):
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, Tokenizer.from_file(str(path / "tokenizer.json"))


def distill_loss(model, teacher, batch: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * KL(teacher || student) + (1 - alpha) * cross-entropy, per predicted token."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits.float()
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=inputs).logits.float(), dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    kl = torch.nn.functional.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True,
                                    reduction="batchmean")
    ce = torch.nn.functional.nll_loss(logp.flatten(0, 1), labels.flatten())
    return alpha * kl + (1 - alpha) * ce


def train(model, train_stream, val_batches, args, teacher=None) -> dict:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    data = batches(train_stream, args.seq_len, args.batch_size, random.Random(args.seed))
    history, started, running = [], time.perf_counter(), None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = next(data)
        if teacher is not None:
            loss = distill_loss(model, teacher, batch, args.distill_alpha)
        else:  # labels are shifted inside the model: inputs and labels are the same window
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_loss = evaluate(model, val_batches)
            elapsed = time.perf_counter() - started
            history.append({"step": step + 1, "train_loss": round(running, 4), "val_loss": round(val_loss, 4),
                            "minutes": round(elapsed / 60, 2)})
            print(f"step {step + 1:5d}  train {running:.3f}  val {val_loss:.3f}  ppl {math.exp(val_loss):.1f}  "
                  f"{elapsed / 60:.1f} min", flush=True)
    return {"history": history, "train_seconds": time.perf_counter() - started}


@torch.no_grad()
def greedy_agreement(model, teacher, val: list[torch.Tensor]) -> float:
    """How often the student's argmax equals the teacher's: the acceptance a greedy draft can expect."""
    model.eval()
    same = total = 0
    for b in val:
        a, t = model(input_ids=b).logits.argmax(-1), teacher(input_ids=b).logits.argmax(-1)
        same += int((a == t).sum())
        total += a.numel()
    model.train()
    return same / total


@torch.no_grad()
def complete(model, tok, prompt: str, max_new_tokens: int = 64) -> str:
    model.eval()
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|endoftext|>"))
    return tok.decode(out[0].tolist())


def save(model, tok, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": args.context, "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n")


def model_card(args, info: dict, params: int, stats: dict, samples: dict, total_seconds: float, tokens: dict) -> str:
    last = stats["history"][-1]
    curve = "\n".join(f"| {h['step']} | {h['train_loss']:.3f} | {h['val_loss']:.3f} | {math.exp(h['val_loss']):.1f} "
                      f"| {h['minutes']:.1f} |" for h in stats["history"])
    shown = "\n\n".join(f"Prompt `{p!r}`, greedy, 64 new tokens:\n\n```python\n{t}\n```" for p, t in samples.items())
    argv = " ".join(sys.argv[1:])
    teacher = stats.get("teacher")
    if teacher:
        title, intro = "tokenforge demo draft model", (
            f"A draft model for speculative decoding with the demo model (`{teacher['path']}`), which it shares\n"
            "its tokenizer with. It was distilled from the demo model: trained to match the teacher's next-token\n"
            f"distributions (KL weight {args.distill_alpha}, cross-entropy on the data {1 - args.distill_alpha:.2f}).\n"
            f"Its greedy token equals the teacher's on **{teacher['greedy_agreement']:.1%}** of held-out positions\n"
            f"(the teacher's own held-out loss is {teacher['val_loss']:.3f}).")
        tokenizer = "the demo model's, unchanged"
    else:
        title, intro = "tokenforge demo model", (
            "A tiny Llama-architecture model that writes Python. It ships inside tokenforge so that `make serve`\n"
            "works offline: no download and no GPU. It is a toy for trying the server and the engine, not a\n"
            "useful code model.")
        tokenizer = "trained on the same training files"
    return f"""# {title}

{intro}

## Data
The Python {info['python']} standard library's source files (`{info['root']}`, `*.py`), without its test suites
(`test/`, `tests/`, `idlelib/`, `lib2to3/`). Files are split by a hash of their path:
{info['train_files']} files ({info['train_bytes'] / 1e6:.1f} MB, {tokens['train']:,} tokens) for training and
{info['val_files']} files ({info['val_bytes'] / 1e6:.1f} MB, {tokens['val']:,} tokens) held out for validation.

## Model
- Llama architecture: {args.layers} layers, hidden size {args.hidden_size}, MLP {args.intermediate_size},
  {args.heads} attention heads with {args.kv_heads} KV heads (GQA), RoPE, tied embeddings, context {args.context}.
- {params / 1e6:.2f} M parameters, stored in bfloat16 (`model.safetensors`).
- Byte-level BPE tokenizer (`tokenizers` library), {args.vocab_size} tokens, {tokenizer}.
  `<|endoftext|>` ends a file and is the EOS token; the chat template is ChatML (`<|im_start|>`, `<|im_end|>`),
  though the model never saw a conversation.

## Training
{args.steps} steps of AdamW (lr {args.lr}, cosine to 10 %, {args.warmup} warm-up steps, weight decay 0.1),
batches of {args.batch_size} x {args.seq_len} tokens ({args.steps * args.batch_size * args.seq_len:,} tokens in
all), float32 on {args.threads} CPU threads. Training took {stats['train_seconds'] / 60:.1f} minutes; the whole
script, tokenizer and evaluation included, {total_seconds / 60:.1f} minutes.

| step | train loss | validation loss | validation perplexity | minutes |
|---|---|---|---|---|
{curve}

Final held-out loss **{last['val_loss']:.3f}** nats per token (perplexity **{math.exp(last['val_loss']):.1f}**).

## Samples
{shown}

## Reproduce
```
.venv/bin/python scripts/train_demo_model.py {argv}
```
Loads in tokenforge (`tokenforge serve`, the default model) and in `transformers`
(`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained`).
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_texts, val_texts, info = load_corpus(args.val_fraction)
    print(f"corpus: {info['train_files']} train files ({info['train_bytes'] / 1e6:.1f} MB), "
          f"{info['val_files']} validation files ({info['val_bytes'] / 1e6:.1f} MB)", flush=True)
    teacher = None
    if args.distill_from is not None:
        teacher, tok = load_teacher(args.distill_from)
        args.vocab_size = tok.get_vocab_size()
    else:
        tok = train_tokenizer(train_texts, args.vocab_size)
    train_stream, val_stream = encode(tok, train_texts), encode(tok, val_texts)
    tokens = {"train": len(train_stream), "val": len(val_stream)}
    print(f"tokenizer: {tok.get_vocab_size()} tokens; {tokens['train']:,} train / {tokens['val']:,} val tokens "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    model = make_model(args, tok)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters", flush=True)
    val_batches = fixed_val_batches(val_stream, args.seq_len, args.eval_batches, args.batch_size)
    stats = train(model, train_stream, val_batches, args, teacher)
    if teacher is not None:
        stats["teacher"] = {"path": str(args.distill_from), "val_loss": round(evaluate(teacher, val_batches), 4),
                            "greedy_agreement": round(greedy_agreement(model, teacher, val_batches), 4)}
        print(f"teacher val loss {stats['teacher']['val_loss']:.3f}; student's greedy token agrees with the "
              f"teacher's on {stats['teacher']['greedy_agreement']:.1%} of validation positions", flush=True)
    samples = {p: complete(model, tok, p) for p in SAMPLE_PROMPTS}
    for text in samples.values():
        print("-" * 40 + "\n" + text, flush=True)
    save(model, tok, args, args.out)
    total = time.perf_counter() - started
    (args.out / "README.md").write_text(model_card(args, info, params, stats, samples, total, tokens))
    (args.out / "training_log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "corpus": info, "tokens": tokens, **stats}, indent=1))
    print(f"saved to {args.out} in {total / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
