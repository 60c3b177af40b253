"""Key conventions as data: which suffix holds which factor, per family of producers.

A convention is what changes between producers for the *same* layer: the prefix style (handled
by ``core.naming``), the suffix of each factor, where alpha lives and how DoRA's magnitude is
stored. Reading accepts every suffix below; writing uses a convention's ``write`` table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# suffix -> (kind, role), for every producer we read. Longest suffix wins when several match.
# kind None marks per-layer extras (alpha, DoRA magnitude, bias delta) that go with any kind.
READ_SUFFIXES: dict[str, tuple[str | None, str]] = {
    # kohya sd-scripts / LyCORIS LoCon / ComfyUI
    ".lora_up.weight": ("lora", "up"), ".lora_down.weight": ("lora", "down"), ".lora_mid.weight": ("lora", "mid"),
    # PEFT / diffusers
    ".lora_B.weight": ("lora", "up"), ".lora_A.weight": ("lora", "down"),
    ".lora_B.default.weight": ("lora", "up"), ".lora_A.default.weight": ("lora", "down"),
    ".lora_magnitude_vector": (None, "magnitude"), ".lora_magnitude_vector.default": (None, "magnitude"),
    # old diffusers attention processors and transformers' PEFT integration
    "_lora.up.weight": ("lora", "up"), "_lora.down.weight": ("lora", "down"),
    ".lora.up.weight": ("lora", "up"), ".lora.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"), ".lora_linear_layer.down.weight": ("lora", "down"),
    # LyCORIS LoHa
    ".hada_w1_a": ("loha", "w1a"), ".hada_w1_b": ("loha", "w1b"), ".hada_w2_a": ("loha", "w2a"),
    ".hada_w2_b": ("loha", "w2b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    # LyCORIS LoKr
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1a"), ".lokr_w1_b": ("lokr", "w1b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2a"), ".lokr_w2_b": ("lokr", "w2b"),
    ".lokr_t2": ("lokr", "t2"),
    # full diffs; lightx2v's modulation diffs and replaced weights are only ever carried through
    ".diff": ("full", "diff"), ".diff_b": (None, "diff_b"), ".diff_m": (None, "diff_m"),
    ".set_weight": (None, "set_weight"),
    # per-layer scalars
    ".alpha": (None, "alpha"), ".dora_scale": (None, "dora_scale"),
}

# Suffixes of adapter families we recognise but cannot represent: a clear error, not a silent drop.
UNSUPPORTED_SUFFIXES: dict[str, str] = {
    ".ia3_l": "IA3", ".ia3_w": "IA3", ".weight_ia3": "IA3", ".ia3_l.weight": "IA3",
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_r": "BOFT",
    ".a1.weight": "GLoRA", ".b1.weight": "GLoRA",
    ".w_norm": "norm fine-tune", ".b_norm": "norm fine-tune",
}
# Roles never resized, whatever their neighbours: carried byte-exact under their own key (LoraFile.passthrough).
PASSTHROUGH_ROLES = ("diff_m", "set_weight")

@dataclass(frozen=True)
class Convention:
    """How one family writes a layer: suffix per role, and whether a row slice can be named."""

    name: str
    write: dict[tuple[str | None, str], str] = field(default_factory=dict)
    alpha_in_tensor: bool = True  # kohya/ComfyUI: `.alpha`; PEFT: adapter metadata
    magnitude_role: str = "dora_scale"  # PEFT stores DoRA as `lora_magnitude_vector` [out]
    slices: bool = False  # can a layer change a row slice of a fused weight?


# (kind, role) -> suffix for the LyCORIS families, the same in every convention that has them
_LYCORIS_WRITE = {(kind, role): suffix for suffix, (kind, role) in READ_SUFFIXES.items()
                  if kind in ("loha", "lokr")}
_KOHYA_WRITE = {("lora", "up"): ".lora_up.weight", ("lora", "down"): ".lora_down.weight",
                ("lora", "mid"): ".lora_mid.weight", ("full", "diff"): ".diff", (None, "diff_b"): ".diff_b",
                (None, "alpha"): ".alpha", (None, "dora_scale"): ".dora_scale", **_LYCORIS_WRITE}

CONVENTIONS: dict[str, Convention] = {
    "kohya": Convention("kohya", _KOHYA_WRITE),
    "comfy": Convention("comfy", _KOHYA_WRITE),
    "peft": Convention("peft", {("lora", "up"): ".lora_B.weight", ("lora", "down"): ".lora_A.weight",
                                (None, "magnitude"): ".lora_magnitude_vector", ("full", "diff"): ".diff",
                                (None, "diff_b"): ".diff_b", **_LYCORIS_WRITE},
                       alpha_in_tensor=False, magnitude_role="magnitude", slices=True),
    # every layer under the key prefix and suffixes it was read with (kohya suffixes for roles it had not)
    "keep": Convention("keep", _KOHYA_WRITE, slices=True),
}
# Factor suffixes of the styles that keep no alpha tensor: there ``-f keep`` bakes the scale into up.
NO_ALPHA_STYLES = (".lora_B.weight", ".lora_B.default.weight")


_LONGEST_SUFFIX = max(map(len, READ_SUFFIXES))


def split_key(key: str) -> tuple[str, str | None, str] | None:
    """(prefix, kind, role) of a tensor key, by its longest known suffix; None if none is known.

    Every suffix starts at a '.' or '_': only those positions in the key's last few characters are looked
    up, leftmost first (the longest), instead of testing every suffix (a 3000-key file is read three times
    per resize)."""
    for start in range(max(1, len(key) - _LONGEST_SUFFIX), len(key)):  # start >= 1: a non-empty prefix
        if key[start] in "._":
            found = READ_SUFFIXES.get(key[start:])
            if found is not None:
                return key[:start], found[0], found[1]
    return None


def split_key_suffix(key: str) -> tuple[str, str | None, str, str] | None:
    """(prefix, kind, role, suffix) of a tensor key; None if no suffix is known."""
    parts = split_key(key)
    return None if parts is None else (*parts, key[len(parts[0]):])


def unsupported_family(key: str) -> str | None:
    """The name of an adapter family we refuse (IA3, OFT...), if the key belongs to one."""
    for suffix, family in UNSUPPORTED_SUFFIXES.items():
        if key.endswith(suffix):
            return family
    return None
