"""The CoCa captioner family (open_clip): loading and decoding.

open_clip's CoCa.generate, and the loop capfilt ran before, feed the whole prefix through both text
stacks at every new token (quadratic in the caption length) and keep finished rows in the batch.
nn.MultiheadAttention has no key/value cache and open_clip's PR for one (#502) was never merged, so
`_coca_decode_cached` steps the model's own modules one token at a time, keeping each layer's keys
and values; only the attention product is written here."""

from __future__ import annotations

from pathlib import Path

from .captioner import Captioner, _NucleusSampler
from .clip import _open_clip_model
from .refs import Reference


def _coca_decode(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler, max_new_tokens: int) -> list[str]:
    """k captions per image: the cached loop where the model's layout allows it, else the full one."""
    model = captioner.model
    max_new_tokens = min(max_new_tokens, model.text_decoder.context_length, model.text.context_length)
    decode = _coca_decode_cached if _cacheable(model) else _coca_decode_full
    return _texts(captioner, decode(captioner, pixels, k, sampler, max_new_tokens))


def _texts(captioner: Captioner, rows: list[list[int]]) -> list[str]:
    eot, pad = captioner.special["end"], captioner.special["pad"]
    texts = []
    for row in rows:
        row = row[1:]
        row = row[:row.index(eot)] if eot in row else row
        texts.append(captioner.decode([t for t in row if t != pad]).strip())
    return texts


def _coca_decode_full(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler, max_new_tokens: int):
    """CoCa's top-p loop (open_clip's CoCa.generate) with per-row streams: the whole prefix again at
    every step. Kept for text towers the cached loop does not cover, and as its reference."""
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
    return out.tolist()


def _cacheable(model) -> bool:
    """The cached loop knows open_clip's own text tower and blocks (every CoCa config it ships but
    the Hugging Face text towers) in batch-first layout."""
    from open_clip.transformer import ResidualAttentionBlock, TextTransformer
    text, decoder = model.text, model.text_decoder
    blocks = [*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn]
    return (isinstance(text, TextTransformer) and text.attn_mask is not None and not text.use_pad_mask
            and text.transformer.batch_first and decoder.batch_first
            and all(type(b) is ResidualAttentionBlock and b.attn.in_proj_weight is not None
                    and b.attn.in_proj_bias is not None for b in blocks))


class _KV:
    """One causal attention's keys and values, (rows, heads, max_len, head_dim), filled a position at a time."""

    def __init__(self, rows: int, heads: int, max_len: int, head_dim: int, like):
        import torch
        self.k = torch.empty(rows, heads, max_len, head_dim, dtype=like.dtype, device=like.device)
        self.v = torch.empty_like(self.k)

    def keep(self, rows):
        self.k, self.v = self.k[rows], self.v[rows]


def _heads(x, heads: int):
    """(B, T, D) -> (B, heads, T, D / heads)."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _attend(attn, q, k, v, mask=None):
    """nn.MultiheadAttention's product and output projection for queries already split into heads."""
    import torch.nn.functional as F
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, t, d = y.shape
    return F.linear(y.transpose(1, 2).reshape(b, t, h * d), attn.out_proj.weight, attn.out_proj.bias)


def _self_step(block, x, cache: _KV, pos: int, mask=None):
    """One ResidualAttentionBlock over the new position of x (B, 1, D), its key and value cached."""
    import torch.nn.functional as F
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    cache.k[:, :, pos:pos + 1] = _heads(k, attn.num_heads)
    cache.v[:, :, pos:pos + 1] = _heads(v, attn.num_heads)
    y = _attend(attn, _heads(q, attn.num_heads), cache.k[:, :, :pos + 1], cache.v[:, :, :pos + 1], mask)
    x = x + block.ls_1(y)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _cross_kv(block, image_embs):
    """A cross-attention block's keys and values of the image tokens: once per image."""
    import torch.nn.functional as F
    attn, d = block.attn, block.attn.embed_dim
    kv = block.ln_1_kv(image_embs)
    k = F.linear(kv, attn.in_proj_weight[d:2 * d], attn.in_proj_bias[d:2 * d])
    v = F.linear(kv, attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
    return _heads(k, attn.num_heads), _heads(v, attn.num_heads)


def _cross_step(block, x, k, v):
    import torch.nn.functional as F
    attn, d = block.attn, block.attn.embed_dim
    q = F.linear(block.ln_1(x), attn.in_proj_weight[:d], attn.in_proj_bias[:d])
    x = x + block.ls_1(_attend(attn, _heads(q, attn.num_heads), k, v))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _coca_decode_cached(captioner: Captioner, pixels, k: int, sampler: _NucleusSampler, max_new_tokens: int):
    """The same sampling as `_coca_decode_full`, one new token per step through both text stacks with
    each layer's keys and values kept; the image side (its tokens and the cross-attention keys and
    values) is computed once per image, and a row that has ended leaves the batch."""
    import torch
    model = captioner.model
    text, decoder = model.text, model.text_decoder
    sot, eot, pad = captioner.special["start"], captioner.special["end"], captioner.special["pad"]
    with torch.inference_mode():
        _, embs = model._encode_image(pixels)
        cross = [tuple(t.repeat_interleave(k, dim=0) for t in _cross_kv(block, embs)) for block in decoder.cross_attn]
        n = pixels.shape[0] * k
        out = torch.full((n, max_new_tokens + 1), pad, dtype=torch.long, device=pixels.device)
        out[:, 0] = sot
        dtype = text.token_embedding.weight.dtype
        like = torch.empty(0, dtype=dtype, device=pixels.device)
        text_kv = [_KV(n, b.attn.num_heads, max_new_tokens, b.attn.head_dim, like) for b in text.transformer.resblocks]
        dec_kv = [_KV(n, b.attn.num_heads, max_new_tokens, b.attn.head_dim, like) for b in decoder.resblocks]
        # The text tower hides pad-token keys from every query (CoCa's legacy mask shifts that by one
        # position: position 0 always visible, position j as token j - 1 decides).
        visible = torch.zeros(n, max_new_tokens + 1, dtype=torch.bool, device=pixels.device)
        live = torch.arange(n, device=pixels.device)
        for pos in range(max_new_tokens):
            tokens = out[live, pos]
            visible[live, pos] = (tokens != pad) if text.correct_cls_mask else (pos == 0 or out[live, pos - 1] != pad)
            mask = torch.zeros(len(live), 1, 1, pos + 1, dtype=dtype, device=pixels.device)
            mask.masked_fill_(~visible[live, None, None, :pos + 1], float("-inf"))
            x = (text.token_embedding(tokens) + text.positional_embedding[pos])[:, None]
            for block, cache in zip(text.transformer.resblocks, text_kv):
                x = _self_step(block, x, cache, pos, mask)
            if text.cls_emb is None:
                x = text.ln_final(x)
            for block, cache, cross_block, (ck, cv) in zip(decoder.resblocks, dec_kv, decoder.cross_attn, cross):
                x = _cross_step(cross_block, _self_step(block, x, cache, pos), ck, cv)
            logits = (decoder.ln_final(x) @ decoder.text_projection)[:, 0]
            token = sampler(logits, live.tolist(), out[live, :pos + 1])
            out[live, pos + 1] = token
            going = token != eot
            if not going.any():
                break
            if not going.all():  # ended rows leave: their caches and image keys are dropped
                keep = going.nonzero().squeeze(-1)
                live = live[keep]
                for cache in (*text_kv, *dec_kv):
                    cache.keep(keep)
                cross = [(ck[keep], cv[keep]) for ck, cv in cross]
    return out.tolist()


def _coca_captioner(ref: Reference, folder: Path | None, device: str, precision: str) -> Captioner:
    import torch
    model, preprocess, tokenizer = _open_clip_model(ref, folder, device, precision)
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

    return Captioner(ref.text, "coca", model.eval(), batch_preprocess, tokenizer, device, precision, decode, special,
                     decoding_loop=_coca_decode)
