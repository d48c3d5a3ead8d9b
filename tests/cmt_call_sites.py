"""The call sites CMT's / CMTTEST's dense ``attention_bias`` passes through, reproduced (not copied) as plain
functions over this library's modules, so a test can run them with the dense tensor and with a `SparseBias`.

Upstream files (read at the commits given; line numbers approximate):

* CMTTEST = Neko-coffee/test @ b0a62a5, ``CMTTEST/projects/mmdet3d_plugin/models/utils/``
* CMT = junjie18/CMT @ 8ea1ddd, ``projects/mmdet3d_plugin/models/utils/``
* mmcv 1.7.2, ``mmcv/cnn/bricks/transformer.py`` (mmcv 2.1.0 has the same ``BaseTransformerLayer.forward``)
"""
import torch
from einops import rearrange


def cmttest_transformer(decoder, x, x_img, query_embed, bev_pos_embed, rv_pos_embed, attn_masks=None,
                        attention_bias=None, reg_branch=None):
    """CMTTEST ``cmt_transformer.py``, ``CmtTransformer.forward`` (lines ~104-135); CMT's is the same without the
    bias (lines ~104-127). ``decoder`` is called as CMTTEST calls ``self.decoder``."""
    bs = x.shape[0]
    # ~105-108: memory and positions sequence-first, BEV cells then camera cells
    bev_memory = rearrange(x, "bs c h w -> (h w) bs c")
    rv_memory = rearrange(x_img, "(bs v) c h w -> (v h w) bs c", bs=bs)
    bev_pos_embed = bev_pos_embed.unsqueeze(1).repeat(1, bs, 1)
    rv_pos_embed = rearrange(rv_pos_embed, "(bs v) h w c -> (v h w) bs c", bs=bs)
    # ~110-112: CMT's float zero key padding mask
    memory, pos_embed = torch.cat([bev_memory, rv_memory], dim=0), torch.cat([bev_pos_embed, rv_pos_embed], dim=0)
    query_embed = query_embed.transpose(0, 1)
    mask = memory.new_zeros(bs, memory.shape[0])
    # ~117-118: [bs, num_query, K] -> [num_query, bs, K] -- the call a SparseBias has to answer
    if attention_bias is not None:
        attention_bias = attention_bias.transpose(0, 1)
    target = torch.zeros_like(query_embed)
    # ~122-133: the decoder call, keywords as CMTTEST passes them
    out_dec = decoder(query=target, key=memory, value=memory, key_pos=pos_embed, query_pos=query_embed,
                      key_padding_mask=mask, attn_masks=[attn_masks, None], attention_bias=attention_bias,
                      reg_branch=reg_branch)
    return out_dec.transpose(1, 2), memory          # ~134-135


def cmttest_decoder(layers, post_norm, query, *args, **kwargs):
    """CMTTEST ``petr_transformer.py``, ``PETRTransformerDecoder.forward`` with ``return_intermediate=True``
    (lines ~440-465; CMT's is the same): every layer gets the keywords unchanged (the bias stays [Q, B, K])."""
    intermediate = []
    for layer in layers:
        query = layer(query, *args, **kwargs)
        intermediate.append(post_norm(query) if post_norm is not None else query)
    return torch.stack(intermediate)


def cmttest_layer(modules, operation_order, attention=None):
    """CMTTEST ``petr_transformer.py``, ``PETRTransformerDecoderLayer.forward`` / ``_forward`` (lines ~560-620:
    drops ``reg_branch`` into ``**kwargs``, hands ``attention_bias`` to mmcv's ``BaseTransformerLayer.forward``),
    and that forward (mmcv 1.7.2 ``transformer.py`` lines 761-860): each attention gets the layer's remaining
    keywords -- the self-attention too (line ~822: ``temp_key = temp_value = query``), the cross-attention with
    the memory (lines ~840-852). ``modules`` is a `sparse_bias.nn.PETRTransformerDecoderLayer` whose attentions,
    norms and FFNs are used; ``attention(i, module, query, key, value, **kw)`` replaces the attention call (for
    the dense reference), default ``module(query, key, value, **kw)``."""
    call = attention or (lambda i, module, q, k, v, **kw: module(q, k, v, **kw))
    attentions = [op for op in operation_order if op in ("self_attn", "cross_attn")]
    for module, op in zip(modules.attentions, attentions):
        module.operation_name = op          # mmcv 1.7.2 line 734: each built attention learns its operation

    def forward(query, key=None, value=None, query_pos=None, key_pos=None, attn_masks=None,
                query_key_padding_mask=None, key_padding_mask=None, attention_bias=None, **kwargs):
        norm_i = attn_i = ffn_i = 0
        if attn_masks is None:
            attn_masks = [None] * len(modules.attentions)
        for op in operation_order:
            if op == "self_attn":        # mmcv: **kwargs, here attention_bias, reach the self-attention too
                query = call(attn_i, modules.attentions[attn_i], query, query, query, query_pos=query_pos,
                             key_pos=query_pos, attn_mask=attn_masks[attn_i], key_padding_mask=query_key_padding_mask,
                             attention_bias=attention_bias)
                attn_i += 1
            elif op == "cross_attn":
                query = call(attn_i, modules.attentions[attn_i], query, key, value, query_pos=query_pos,
                             key_pos=key_pos, attn_mask=attn_masks[attn_i], key_padding_mask=key_padding_mask,
                             attention_bias=attention_bias)
                attn_i += 1
            elif op == "norm":
                query = modules.norms[norm_i](query)
                norm_i += 1
            else:
                query = modules.ffns[ffn_i](query)
                ffn_i += 1
        return query

    return forward


def cmttest_petr_attention(module, query, key, value, query_pos=None, key_pos=None, attn_mask=None,
                           key_padding_mask=None, attention_bias=None):
    """The dense version: CMTTEST ``petr_transformer.py``, ``PETRMultiheadAttention.forward`` (lines ~130-245),
    on the parameters of a `sparse_bias.nn.SparseBiasMultiheadAttention` (``module.attn``, the
    ``nn.MultiheadAttention`` they live in). Sequence-first tensors, a dense ``attention_bias`` ``[Q, B, K]``."""
    if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
        key_pos = query_pos
    identity = query
    if query_pos is not None:
        query = query + query_pos
    if key_pos is not None:
        key = key + key_pos
    final_attn_mask = attn_mask
    # ~185-215: only in cross-attention (key.shape[0] != query.shape[0]); [Q, B, K] -> [B * H, Q, K], added to a
    # bool mask turned to -inf or to a float mask
    if attention_bias is not None and key.shape[0] != query.shape[0]:
        num_queries, bs, num_features = attention_bias.shape
        bias = attention_bias.transpose(0, 1).unsqueeze(1).expand(-1, module.num_heads, -1, -1)
        bias = bias.reshape(bs * module.num_heads, num_queries, num_features)
        if final_attn_mask is not None:
            if final_attn_mask.dtype == torch.bool:
                blocked = final_attn_mask if final_attn_mask.dim() == 3 else final_attn_mask.expand_as(bias)
                final_attn_mask = torch.zeros_like(bias).masked_fill(blocked, float("-inf")) + bias
            else:
                final_attn_mask = final_attn_mask + bias
        else:
            final_attn_mask = bias
    # ~225-245: with a bias the key padding mask is not passed (CMT's is all zeros)
    padding = None if attention_bias is not None and final_attn_mask is not None else key_padding_mask
    out = module.attn(query, key, value, attn_mask=final_attn_mask, key_padding_mask=padding, need_weights=False)[0]
    return identity + out
