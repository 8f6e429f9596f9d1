"""Tiny llama-style models built on the fly, so tests and CPU smoke benchmarks need no hub.

`build_tokenizer` trains a byte-level BPE on a small generated corpus and gives it a chat
template; `build_model` writes a randomly initialised llama (head_dim 64, which vLLM's CPU
attention supports); `train_teacher` fits a model to the corpus for a few hundred steps so
that its next-token distribution is peaked: a random student then has a real reverse-KL gap
to close.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

_WORDS = (
    "one two three four five six seven eight nine ten plus minus times equals the answer is "
    "what how many apples pears has tom ann gives takes left total so we get first then"
).split()


def synthetic_corpus(n_lines: int, seed: int = 0) -> list[str]:
    """Short arithmetic word problems with their answers: regular enough to learn quickly."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        who, fruit = rng.choice(["tom", "ann"]), rng.choice(["apples", "pears"])
        lines.append(
            f"{who} has {a} {fruit} and gets {b} more. how many {fruit}? "
            f"first {a} plus {b} equals {a + b}. so the answer is {a + b}."
        )
    return lines


def synthetic_examples(n: int, seed: int) -> list[dict[str, str]]:
    """Questions with a worked answer (a demonstration / reference completion)."""
    rows = []
    for line in synthetic_corpus(n, seed):
        question, answer = line.split("? ", 1)
        rows.append({"question": question + "?", "answer": answer})
    return rows


def synthetic_prompts(n: int, seed: int) -> list[str]:
    return [r["question"] for r in synthetic_examples(n, seed)]


def train_bpe(texts: list[str], vocab_size: int, special_tokens: list[str], **names):
    """A byte-level BPE trained on `texts`, as a transformers fast tokenizer; `names` sets its
    special tokens (eos_token=..., bos_token=..., pad_token=...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer folder."""
    fast = train_bpe(
        synthetic_corpus(2000) + [" ".join(_WORDS)],
        vocab_size,
        SPECIAL_TOKENS,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
):
    """A random-init llama with head_dim 64, saved with its tokenizer as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return model


def train_teacher(model_dir: str | Path, steps: int = 150, lr: float = 3e-3, seed: int = 0):
    """Fit the model in `model_dir` to the synthetic corpus, in chat format, and save it back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rng = random.Random(seed)
    corpus = synthetic_corpus(4000, seed=seed + 1)
    texts = []
    for line in corpus:
        question, answer = line.split("? ", 1)
        texts.append(
            tok.apply_chat_template(
                [
                    {"role": "user", "content": question + "?"},
                    {"role": "assistant", "content": answer},
                ],
                tokenize=False,
            )
        )
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = tok(rng.sample(texts, 32), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return loss.item()


def build_pair(root: str | Path, teacher_steps: int = 200) -> tuple[Path, Path]:
    """A trained 4-layer teacher and a student made of its layers 0 and 2 (one tokenizer).

    The same recipe as the quickstart's real pair: a shallower copy of the teacher has the
    right embeddings and a real gap to close, so on-policy samples carry signal from step 0.
    """
    from opd.models.registry import prepare_layer_dropped

    root = Path(root)
    tok_dir, teacher, student = root / "tokenizer", root / "teacher", root / "student"
    build_tokenizer(tok_dir)
    build_model(teacher, tok_dir, layers=4, seed=1)
    train_teacher(teacher, steps=teacher_steps)
    prepare_layer_dropped(teacher, keep_every=2, out=student)
    return teacher, student
