"""Train the embedded demo model on the Python standard library (reproducible, CPU, ~17 minutes on 2 cores).

    .venv/bin/python scripts/train_demo_model.py            # writes promptcache/assets/default-model
    .venv/bin/python scripts/train_demo_model.py --steps 50 --out /tmp/demo   # a quick look

The model has the ``demo`` shape (Llama layout, 6 layers, hidden 256, ~5.8M parameters, 11.5 MB in
bfloat16) and the shipped tokenizer. Text: ``promptcache.model.demo_corpus`` (the standard
library's top-level modules and some packages; other packages are held out). Fixed seed, fixed
order of batches: the same machine type gives the same weights. It reports held-out bits per byte
of source (the number the README quotes and ``tests/test_demo_model.py`` checks).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from promptcache.model.demo_corpus import held_out_files, held_out_sample, train_files  # noqa: E402
from promptcache.model.shapes import DEFAULT_MODEL_DIR, SHAPES, TOKENIZER_DIR, write_checkpoint  # noqa: E402

BOS = "<|endoftext|>"  # starts every file, in training and in evaluation


def encode_files(tok: Tokenizer, files: list[Path]) -> torch.Tensor:
    bos = tok.token_to_id(BOS)
    ids: list[int] = []
    for path in files:
        ids.append(bos)
        ids += tok.encode(path.read_text(encoding="utf-8", errors="replace")).ids
    return torch.tensor(ids, dtype=torch.long)


def bits_per_byte(model: torch.nn.Module, tok: Tokenizer, texts: list[str]) -> float:
    """Mean bits per UTF-8 byte over ``texts``, each scored whole after a BOS token."""
    bos = tok.token_to_id(BOS)
    nats, nbytes = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[bos] + tok.encode(text).ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            nbytes += len(text.encode("utf-8"))
    model.train()
    return nats / math.log(2) / nbytes


def held_out_texts(limit: int) -> list[str]:
    texts = []
    for path in held_out_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        texts += [text[i:i + 2000] for i in range(0, len(text), 2000)]
    step = max(1, len(texts) // limit)
    return texts[::step][:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    ap.add_argument("--context", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads, 0 = all cores (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="(default: the shipped model's directory)")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    data = encode_files(tok, train_files())
    evals = held_out_texts(64)
    print(f"train: {len(train_files())} files, {len(data):,} tokens; held out: {len(held_out_files())} files")

    shape = {k: v for k, v in SHAPES["demo"].items() if k not in ("model_type", "architectures")}
    model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=tok.token_to_id(BOS)))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 16)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.monotonic()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + args.context] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 400 == 0 or step + 1 == args.steps:
            bar.write(f"step {step + 1}: held-out {bits_per_byte(model, tok, evals):.3f} bits/byte")
    minutes = (time.monotonic() - t0) / 60

    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied embeddings
    write_checkpoint("demo", args.out, dtype="bfloat16", tensors=tensors)
    (args.out / ".promptcache-identity.json").unlink(missing_ok=True)  # the old weights' digest
    trained = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    print(f"trained {args.steps} steps in {minutes:.1f} min on {torch.get_num_threads()} threads")
    print(f"held-out, {len(evals)} chunks: {bits_per_byte(trained, tok, evals):.3f} bits/byte (bf16 weights)")
    print(f"held-out test sample: {bits_per_byte(trained, tok, held_out_sample()):.3f} bits/byte")
    print("written:", args.out)


if __name__ == "__main__":
    main()
