"""Offline word-level tokenizer for the embedded default CLIP.

Built with the `tokenizers` library from the phantom report vocabulary and saved as a
`PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(dir)` loads it with no network.
The end-of-text id is deliberately not 2: CLIP's text tower pools at the first EOS position
unless `eos_token_id == 2`, a legacy argmax path (see shared/reference/offline_models.md).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
SPECIALS = [PAD, UNK, SOT, EOT]  # ids 0..3; EOT = 3

# Words a clinician may type in prompts beyond what phantom reports contain.
EXTRA_WORDS = """
a an the of in on at with without no not nor absent absence evidence free negative denies
is are there this image features feature shows showing show seen visible present presence
but and or , . : ; - left right upper lower middle lobe lung lungs heart chest x-ray xray ct
scan slice dermoscopy lesion skin photo region area finding findings normal abnormal
""".split()

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """The pre-tokenisation used everywhere: lower-case words and single punctuation marks."""
    return _WORD.findall(text.lower())


def build_tokenizer(corpus: Iterable[str], out_dir: str | Path | None = None, max_length: int = 48, min_count: int = 1):
    """Train a WordLevel tokenizer on `corpus`; optionally `save_pretrained(out_dir)`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for text in corpus for w in words(text))
    counts.update(EXTRA_WORDS)
    vocab_words = sorted(w for w, c in counts.items() if c >= min_count and w not in SPECIALS)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + vocab_words)}

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD.pattern), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SOT,
        eos_token=EOT,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_length,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
