"""kohya's underscored names back to dotted module paths, by a vocabulary of multi-word atoms.

kohya writes ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` as
``input_blocks_4_1_transformer_blocks_0_attn1_to_q``: '.' and '_' collide, so the way back is a
greedy longest match over the identifiers that really contain underscores.
"""
from __future__ import annotations

from functools import lru_cache

# Identifiers with underscores in them, in every model family we name (SGM/diffusers UNets, Flux,
# CLIP, T5). Single words need no entry.
ATOMS: tuple[str, ...] = (
    # SGM UNet
    "input_blocks", "output_blocks", "middle_block", "transformer_blocks", "proj_in", "proj_out",
    "emb_layers", "in_layers", "out_layers", "skip_connection", "time_embed", "label_emb",
    "to_q", "to_k", "to_v", "to_out",
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "conv_norm_out", "time_embedding", "add_embedding", "class_embedding", "linear_1", "linear_2",
    # Flux (BFL)
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "final_layer", "adaLN_modulation", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer",
    "out_layer", "query_norm", "key_norm", "linear1_qkv",
    # Flux (diffusers)
    "single_transformer_blocks", "controlnet_x_embedder", "x_embedder", "context_embedder", "norm_out",
    "norm1_context", "ff_context",
    "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj", "proj_mlp", "time_text_embed", "timestep_embedder",
    "text_embedder", "guidance_embedder", "norm_added_q", "norm_added_k", "norm_q", "norm_k",
    # CLIP / T5
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "text_projection",
    "SelfAttention", "EncDecAttention", "DenseReluDense", "layer_norm", "wi_0", "wi_1", "relative_attention_bias",
)


class Vocabulary:
    """Greedy longest-match re-dotting over one family's atoms (the common ones included)."""

    def __init__(self, atoms: tuple[str, ...]):
        table: dict[str, list[tuple[str, ...]]] = {}
        for atom in dict.fromkeys(atoms):
            words = tuple(atom.split("_"))
            table.setdefault(words[0], []).append(words)
        self._table = {first: tuple(sorted(group, key=len, reverse=True)) for first, group in table.items()}
        self.dotted = lru_cache(maxsize=65536)(self._dotted)

    def _dotted(self, underscored: str) -> str:
        tokens = underscored.split("_")
        out: list[str] = []
        i = 0
        while i < len(tokens):
            for words in self._table.get(tokens[i], ()):
                if tuple(tokens[i:i + len(words)]) == words:
                    out.append("_".join(words))
                    i += len(words)
                    break
            else:
                out.append(tokens[i])
                i += 1
        return ".".join(out)


COMMON = Vocabulary(ATOMS)


def dotted(underscored: str) -> str:
    """``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``."""
    return COMMON.dotted(underscored)


def underscored(dotted_name: str) -> str:
    return dotted_name.replace(".", "_")
