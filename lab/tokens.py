"""Compact token sets for the shapes-world models, saved in the standard Hugging Face formats so
that the same loaders that read real checkpoints read ours.

- CLIP: a word-level `tokenizer.json` (PreTrainedTokenizerFast) over the world's clean vocabulary.
  Ids: [PAD]=0 (open_clip pads with 0), [UNK]=1, [SOT]=2, the words, ",", and [EOT] last, because
  open_clip pools the text tower at the argmax of the token ids. Every word outside the clean
  vocabulary (web synonyms, spam, file names) is [UNK]: unfamiliar to the model, as intended.
- BLIP: a BERT WordPiece `vocab.txt` with whole words only, [DEC] as BLIP's decoder start token.
"""

from __future__ import annotations

import re
from pathlib import Path

from capfilt.world.captions import SYNONYMS, VOCABULARY, WEB_PREFIXES, WEB_SUFFIXES

PUNCTUATION = (",",)
CLIP_SPECIALS = ("[PAD]", "[UNK]", "[SOT]")
CLIP_EOT = "[EOT]"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def web_words() -> tuple[list[str], list[str]]:
    """The words and punctuation runs of the world's web phrasings that the clean vocabulary lacks:
    the synonyms and the words of the prefixes and suffixes ("crimson", "wallpaper", ":", "|")."""
    text = " ".join(WEB_PREFIXES + WEB_SUFFIXES + tuple(w for ws in SYNONYMS.values() for w in ws))
    words = sorted(set(re.findall(r"\w+", text)) - set(VOCABULARY))
    marks = sorted(set(re.findall(r"[^\w\s]+", text)) - set(PUNCTUATION))
    return words, marks


def clip_vocab(web: bool = False) -> dict[str, int]:
    """The CLIP token set; web=True adds the web phrasings' words (`web_words`)."""
    extra = [t for part in web_words() for t in part] if web else []
    tokens = list(CLIP_SPECIALS) + list(VOCABULARY) + list(PUNCTUATION) + extra + [CLIP_EOT]
    return {t: i for i, t in enumerate(tokens)}


def save_clip_tokenizer(folder: Path, context_length: int, web: bool = False) -> int:
    """Write tokenizer.json + tokenizer_config.json into folder; return the vocabulary size."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = clip_vocab(web)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    tok.post_processor = processors.TemplateProcessing(
        single=f"[SOT] $A {CLIP_EOT}", special_tokens=[("[SOT]", vocab["[SOT]"]), (CLIP_EOT, vocab[CLIP_EOT])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[SOT]", eos_token=CLIP_EOT, unk_token="[UNK]", pad_token="[PAD]",
        model_max_length=context_length)
    fast.save_pretrained(str(folder))
    return len(vocab)


def save_blip_processor(folder: Path, image_size: int, mean, std, extra: list[str] = ()):
    """Write a BlipProcessor (image processor + BERT tokenizer over the world's words and `extra`)
    into folder; return it."""
    from transformers import BertTokenizerFast, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(list(BERT_SPECIALS) + list(VOCABULARY) + list(PUNCTUATION) + list(extra)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, bos_token="[DEC]",
                                  model_max_length=40)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(mean),
                                         image_std=list(std), do_convert_rgb=True)
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(str(folder))
    return processor
