"""The BLIP captioner family (transformers BlipForConditionalGeneration): loading and decoding, and the
check of a BLIP folder's configuration, tokenizer and image processor (the ITM, itm.py, is a BLIP too)."""

from __future__ import annotations

from pathlib import Path

from .captioner import Captioner, _NucleusSampler
from .constants import HF_CONFIG, HF_WEIGHTS
from .device import _torch_dtype
from .errors import ModelNotAvailable
from .folders import loads
from .refs import Reference
from .safety import _has_weights, _refuse_pickles


class _ChosenTokenProcessor:
    """A transformers logits processor that samples with _NucleusSampler and leaves only the
    chosen token: greedy decoding then emits exactly the sampled sequence."""

    def __init__(self, sampler: _NucleusSampler):
        self.sampler = sampler

    def __call__(self, input_ids, scores):
        import torch
        chosen = self.sampler(scores, generated=input_ids)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


def _blip_decode(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler, max_new_tokens: int) -> list[str]:
    return _texts(captioner, _blip_decode_cached(captioner, pixels, k, sampler, max_new_tokens))


def _blip_decode_cached(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler, max_new_tokens: int):
    """k captions per image (token ids, start first), one token per step with transformers' key/value
    cache (the image keys and values computed at the first step), as BlipForConditionalGeneration.
    generate samples, except that a row that has ended leaves the batch: generate keeps it, padded,
    until the last row ends."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache
    model = captioner.model
    start, end, pad = captioner.special["start"], captioner.special["end"], captioner.special["pad"]
    with torch.inference_mode():
        image_embeds = model.vision_model(pixel_values=pixels)[0].repeat_interleave(k, dim=0)
        max_new_tokens = min(max_new_tokens, model.config.text_config.max_position_embeddings - 1)
        n = image_embeds.shape[0]
        out = torch.full((n, max_new_tokens + 1), pad, dtype=torch.long, device=image_embeds.device)
        out[:, 0] = start
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        live = torch.arange(n, device=image_embeds.device)
        for pos in range(max_new_tokens):
            logits = model.text_decoder(  # a mask of ones, as generate passes (a sampled pad id is a token)
                input_ids=out[live, pos:pos + 1], attention_mask=torch.ones_like(out[live, :pos + 1]),
                encoder_hidden_states=image_embeds, past_key_values=cache,
                use_cache=True, is_decoder=True, return_dict=True,
                cache_position=torch.tensor([pos], device=image_embeds.device)).logits[:, -1].float()
            token = sampler(logits, live.tolist(), out[live, :pos + 1])
            out[live, pos + 1] = token
            going = token != end
            if not going.any():
                break
            if not going.all():
                keep = going.nonzero().squeeze(-1)
                live, image_embeds = live[keep], image_embeds[keep]
                cache.batch_select_indices(keep)
    return out.tolist()


def _texts(captioner: Captioner, ids) -> list[str]:
    """batch_decode(ids, skip_special_tokens=True), special ids dropped here once: the slow
    tokenizer's own skip recomputes its special-token list for every token (a fifth of a shapes
    captioning pass)."""
    tokenizer = captioner.tokenizer
    special = set(tokenizer.all_special_ids)
    return [tokenizer.decode([t for t in row if t not in special]).strip() for row in ids]


def _blip_decode_generate(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler,
                          max_new_tokens: int):
    """The same sampling through transformers' generate (every row in the batch to the end): the
    reference `_blip_decode_cached` is tested and benchmarked against."""
    import torch
    from transformers import LogitsProcessorList
    model = captioner.model
    with torch.inference_mode():
        image_embeds = model.vision_model(pixel_values=pixels)[0]
        image_embeds = image_embeds.repeat_interleave(k, dim=0)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        start = torch.full((image_embeds.shape[0], 1), captioner.special["start"], dtype=torch.long,
                           device=image_embeds.device)
        max_new_tokens = min(max_new_tokens, model.config.text_config.max_position_embeddings - 1)
        ids = model.text_decoder.generate(
            input_ids=start, eos_token_id=captioner.special["end"], pad_token_id=captioner.special["pad"],
            encoder_hidden_states=image_embeds, encoder_attention_mask=mask, do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([_ChosenTokenProcessor(sampler)]))
    return ids.tolist()


def _blip_model(ref: Reference, folder: Path, device: str, precision: str):
    from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    if config.model_type != "blip":
        raise ValueError(f"model {ref.text!r}: a transformers {config.model_type!r} model, not a BLIP captioner")
    if not _has_weights(folder, HF_WEIGHTS):
        raise ModelNotAvailable(f"model {ref.text!r}: {folder} has {HF_CONFIG} but no weights")

    def load():
        return BlipForConditionalGeneration.from_pretrained(
            str(folder), torch_dtype=_torch_dtype(precision), trust_remote_code=False)

    model = _refuse_pickles(ref, load).to(device)
    # The slow (PIL) image processor, as saved with the Salesforce BLIP checkpoints.
    processor = BlipProcessor.from_pretrained(str(folder), use_fast=False, trust_remote_code=False)
    text = model.config.text_config
    special = {"start": text.bos_token_id, "end": text.sep_token_id, "pad": text.pad_token_id}

    def preprocess(images):
        return processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values

    def decode(ids):
        return processor.decode(ids, skip_special_tokens=True)

    return Captioner(ref.text, "blip", model.eval(), preprocess, processor.tokenizer, device, precision,
                     decode, special, processor=processor, decoding_loop=_blip_decode)


def check_blip_loads(ref: Reference, folder: Path) -> None:
    """A BLIP folder's configuration, tokenizer and image processor load as the loaders load them."""
    import transformers
    loads(ref, folder, f"configuration ({HF_CONFIG})", lambda: transformers.AutoConfig.from_pretrained(
        str(folder), trust_remote_code=False))
    loads(ref, folder, "tokenizer and image processor (vocab.txt, preprocessor_config.json, ...)",
          lambda: transformers.BlipProcessor.from_pretrained(str(folder), use_fast=False, trust_remote_code=False))
