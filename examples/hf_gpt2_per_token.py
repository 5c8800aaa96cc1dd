"""A tiny GPT-2 (from ``GPT2Config``) guided per token by an untrained LSTM, in the Hugging Face
``Trainer``, with padding excluded from the CKA.

    python examples/hf_gpt2_per_token.py --steps 20
    torchrun --nproc-per-node 2 examples/hf_gpt2_per_token.py --steps 5 --gather global   # DDP, gloo

The guidance lines are marked ``# +``. The data are random token sequences of random lengths,
right-padded; the attention mask keeps the padding out of both the task loss (labels -100) and
the per-token CKA.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.utils import logging as hf_logging

from guidance_kernels.integrations.huggingface import GuidedTrainer  # +
from guidance_kernels.train import Continuous


class LSTMGuide(nn.Module):
    """Token ids (n, T) -> per-token features of two stacked LSTMs (n, T, d)."""

    def __init__(self, vocab: int, d: int = 24):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm1 = nn.LSTM(d, d, batch_first=True)
        self.lstm2 = nn.LSTM(d, d, batch_first=True)

    def forward(self, ids):
        h, _ = self.lstm1(self.emb(ids))
        return self.lstm2(h)[0]


class RandomText(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq), generator=g)
        self.lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = (torch.arange(self.ids.shape[1]) < self.lengths[i]).long()
        ids = torch.where(mask.bool(), self.ids[i], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def build(vocab: int = 64, seq: int = 16):
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg), LSTMGuide(vocab)


def make_trainer(model, guide, dataset, *, steps: int, batch: int, out: str, alpha=1.0, gather="rank",
                 **trainer_kwargs):
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return GuidedTrainer(  # + (was: Trainer)
        model=model, args=args, train_dataset=dataset,
        guide=guide,  # +
        guidance=dict(target_layers="transformer.h.*", guide_layers=["lstm1", "lstm2"],  # +
                      flatten="token", alpha=Continuous(alpha), gather=gather),
        **trainer_kwargs,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--out", default="hf_gpt2_out")
    p.add_argument("--gather", choices=["rank", "global"], default="rank",
                   help="under torchrun: per-rank loss, or the exact loss over the global batch")
    a = p.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model, guide = build(seq=a.seq)
    trainer = make_trainer(model, guide, RandomText(a.batch * a.steps, a.seq, 64), steps=a.steps,
                           batch=a.batch, out=a.out, gather=a.gather)
    trainer.train()
    if trainer.is_world_process_zero():
        print("pairs:", trainer.guidance.pairs)
        print("last log:", {k: round(v, 4) for k, v in trainer.state.log_history[-2].items()})
    if torch.distributed.is_initialized():  # under torchrun: shut gloo down before exit (its threads
        torch.distributed.destroy_process_group()  # left to static destruction can abort a rank)


if __name__ == "__main__":
    main()
