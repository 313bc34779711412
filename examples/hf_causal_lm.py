"""A Hugging Face causal language model (GPT-2 from a small config) trained with ddp_train.

    python examples/hf_causal_lm.py                                    # one process
    torchrun --standalone --nproc_per_node=2 examples/hf_causal_lm.py  # DDP, two processes
    ddp-train fit --task examples/hf_causal_lm.py:CausalLM --epochs 2

Nothing is downloaded: the tokenizer is a word-level `tokenizers` model trained here on the
bundled text and wrapped in `PreTrainedTokenizerFast`; the model is `GPT2LMHeadModel` built from a
`GPT2Config`. Samples are unpadded sentences; `DataCollatorForLanguageModeling` pads each batch to
its longest sentence (dynamic padding) and sets the labels of padding to -100. `count` tells
ddp_train how many tokens each batch's loss averages over, so the gradient, the logged loss and
val_loss are exact token means however the tokens fall into batches and ranks.
Needs `pip install 'ddp-train[examples]'` (transformers and tokenizers).
"""

from __future__ import annotations

import re

import torch

from ddp_train import Task, fit

TEXT = """\
A process that trains a model on many machines must agree with its peers about everything that
matters. It must agree on which samples each one reads, on when to stop, on when to write a
checkpoint, and on what to do when one of them fails. When they agree, the job can be stopped at
any step and resumed on the next. When they agree, the numbers it reports are the numbers a single
process would have reported. When they do not agree, a job hangs in a collective that one rank
never reaches. When they do not agree, it reports an accuracy that depends on how many processes
happened to run it. The cure is dull and reliable. Every decision is made from values that every
rank holds. Every random draw that shapes training is a function of the seed, the epoch and the
sample. Every file is written once, completely, and renamed into place. A checkpoint that is half
written is not a checkpoint. An error that prints a traceback from every rank is not an error
message. A metric that is a mean of means is not the metric. A loss that is a mean of batch means
is not the mean over the tokens. Small tools that keep these promises are easier to trust than
large tools that do not.
"""
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.,])\s+", " ".join(text.split())) if s.strip()]


def build_tokenizer(text: str):
    """A word-level tokenizer trained on `text`, as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences(text), trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


class CausalLM(Task):
    def __init__(self, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, val_every: int = 4):
        self.n_embd, self.n_layer, self.n_head, self.val_every = n_embd, n_layer, n_head, val_every
        self.tokenizer = build_tokenizer(TEXT)

    def data(self, cfg):
        encoded = [{"input_ids": self.tokenizer(s + " [EOS]")["input_ids"]} for s in sentences(TEXT)]
        val = set(range(0, len(encoded), self.val_every))  # every val_every-th sentence
        return {"train": [e for i, e in enumerate(encoded) if i not in val],
                "val": [e for i, e in enumerate(encoded) if i in val]}

    def collate(self, split):
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(self.tokenizer, mlm=False, return_tensors="pt")

    def model(self, cfg):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=len(self.tokenizer), n_positions=64, n_embd=self.n_embd,
                            n_layer=self.n_layer, n_head=self.n_head, pad_token_id=self.tokenizer.pad_token_id,
                            eos_token_id=self.tokenizer.eos_token_id, bos_token_id=self.tokenizer.eos_token_id)
        return GPT2LMHeadModel(config)

    def loss(self, model, batch):
        return model(**batch).loss  # the mean over the batch's valid (shifted) tokens

    def count(self, batch):
        return (batch["labels"][:, 1:] != -100).sum()  # the tokens that loss averages over

    def eval_step(self, model, batch):
        out = model(**batch)
        return out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), out.loss  # one forward

    def metrics(self):
        import torchmetrics

        return {"acc": torchmetrics.classification.MulticlassAccuracy(len(self.tokenizer), average="micro",
                                                                      ignore_index=-100)}

    def blocks(self, model):
        return list(model.transformer.h)  # what --strategy fsdp shards one by one


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    result = fit(CausalLM(), epochs=20, batch_size=8, lr=3e-3, optimizer="adamw", run_dir="runs/hf-causal-lm")
    print(f"{result.status}: step {result.step}, val_loss {result.metrics.get('val_loss', float('nan')):.3f}, "
          f"val_acc {result.metrics.get('val_acc', float('nan')):.3f}; {result.run_dir}")
