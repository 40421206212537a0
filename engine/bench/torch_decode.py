#!/usr/bin/env python3
"""Batch-1 decode speed of the PyTorch peer (../shared/bench/bitllama_torch.py), for `engine bench-generate`.

The peer has no incremental decoding (no TTT state carry, no KV cache): generating a token re-runs the
eager forward pass over the whole prefix, as a PyTorch user of that model would (torch.no_grad, fp32). The
TTT forward needs a length that is a multiple of its mini-batch, so the prefix is left-padded with token 0
to the next multiple (the padding sits before the prompt). Greedy decoding; prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--peer", default=os.path.join(os.path.dirname(__file__), "../../../shared/bench"))
p.add_argument("--arch", choices=["bitttt", "llama"], default="bitttt")
p.add_argument("--dim", type=int, default=768)
p.add_argument("--layers", type=int, default=12)
p.add_argument("--heads", type=int, default=12)
p.add_argument("--vocab", type=int, default=16384)
p.add_argument("--prompt-tokens", type=int, default=64)
p.add_argument("--tokens", type=int, default=64)
p.add_argument("--mini-batch", type=int, default=16)
p.add_argument("--threads", type=int, default=0)
a = p.parse_args()

sys.path.insert(0, os.path.abspath(a.peer))
import torch  # noqa: E402
import bitllama_torch as peer  # noqa: E402

if a.threads:
    torch.set_num_threads(a.threads)
cfg = argparse.Namespace(arch=a.arch, dim=a.dim, layers=a.layers, heads=a.heads, vocab=a.vocab, ctx=a.prompt_tokens + a.tokens + a.mini_batch,
                         dtype="fp32", ffn="4x", mini_batch=a.mini_batch, ttt_base_lr=1.0, no_token_avg=False, seed=0,
                         compile=False, batch=1, device="cpu")
model = peer.make_model(cfg, torch.device("cpu")).eval()
params = sum(p.numel() for p in model.parameters())
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
g = torch.Generator().manual_seed(1)
prompt = torch.randint(0, a.vocab, (a.prompt_tokens,), generator=g).tolist()
mb = a.mini_batch if a.arch == "bitttt" else 1


def logits_last(tokens):
    pad = (-len(tokens)) % mb
    x = torch.tensor([[0] * pad + tokens])
    return model(x)[0, -1]


with torch.no_grad():
    t0 = time.perf_counter()
    nxt = int(logits_last(prompt).argmax())
    prompt_s = time.perf_counter() - t0
    seq = prompt + [nxt]
    t1 = time.perf_counter()
    for _ in range(a.tokens):
        nxt = int(logits_last(seq).argmax())
        seq.append(nxt)
    decode_s = time.perf_counter() - t1
print(json.dumps({
    "impl": "pytorch %s eager fp32, full-prefix recompute per token (peer has no decode cache)" % torch.__version__,
    "arch": a.arch, "dim": a.dim, "layers": a.layers, "heads": a.heads, "vocab": a.vocab, "params": params,
    "threads": torch.get_num_threads(), "prompt_tokens": a.prompt_tokens, "decode_tokens": a.tokens,
    "prompt_tokens_per_s": a.prompt_tokens / prompt_s, "decode_tokens_per_s": a.tokens / decode_s,
    "weight_bytes": weight_bytes,
}))
