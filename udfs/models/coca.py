"""The CoCa captioner family (open_clip): loading and decoding."""

from __future__ import annotations

from .captioner import Captioner, _NucleusSampler
from .clip import _open_clip_model
from .refs import Reference


def _coca_decode(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler, max_new_tokens: int) -> list[str]:
    """CoCa's top-p loop (open_clip's CoCa.generate) with per-row streams."""
    import torch
    model = captioner.model
    sot, eot, pad = captioner.special["start"], captioner.special["end"], captioner.special["pad"]
    with torch.inference_mode():
        latent, embs = model._encode_image(pixels)
        latent, embs = latent.repeat_interleave(k, dim=0), embs.repeat_interleave(k, dim=0)
        images = pixels.repeat_interleave(k, dim=0)
        out = torch.full((images.shape[0], 1), sot, dtype=torch.long, device=images.device)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        for _ in range(max_new_tokens):
            logits = model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            token = torch.full_like(done, pad, dtype=torch.long)
            live = (~done).nonzero().squeeze(-1)
            token[live] = sampler(logits[live], live.tolist(), out[live])
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == eot
            if done.all():
                break
    texts = []
    for row in out.tolist():
        row = row[1:]
        row = row[:row.index(eot)] if eot in row else row
        texts.append(captioner.decode([t for t in row if t != pad]).strip())
    return texts


def _coca_captioner(ref: Reference, device: str, precision: str) -> Captioner:
    import torch
    model, preprocess, tokenizer = _open_clip_model(ref, device, precision)
    if not hasattr(model, "text_decoder"):
        raise ValueError(f"model {ref.text!r}: an open_clip model without a text decoder (a CLIP, not a CoCa); "
                         f"it cannot caption")
    inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a transformers tokenizer
    if inner is not None:
        special = {"start": inner.bos_token_id if inner.bos_token_id is not None else inner.cls_token_id,
                   "end": inner.eos_token_id if inner.eos_token_id is not None else inner.sep_token_id,
                   "pad": inner.pad_token_id or 0}
        decode = lambda ids: inner.decode(ids, skip_special_tokens=True)  # noqa: E731
    else:
        import open_clip
        special = {"start": tokenizer.sot_token_id, "end": tokenizer.eot_token_id, "pad": 0}
        decode = lambda ids: open_clip.decode(torch.tensor(ids)).replace("<start_of_text>", "").strip()  # noqa: E731

    def batch_preprocess(images):
        return torch.stack([preprocess(im) for im in images])

    return Captioner(ref.text, "coca", model.eval(), batch_preprocess, tokenizer, device, precision, decode, special)
