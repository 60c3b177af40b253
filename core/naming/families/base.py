"""The protocol of one model family's naming, with the rules most families share.

A family knows its model's paths (ComfyUI's model keys under ``diffusion_model.``), the underscored
identifiers that let kohya/musubi names be re-dotted, the trainer renames back to ComfyUI's paths,
which text-encoder prefixes mean which encoder, how to recognise its LoRAs (marks on key names and
widths), and which output conventions ComfyUI 0.3.64 loads for it. Producer prefixes
(``lora_unet_``, ``transformer.``, ``diffusion_model.`` ...) are stripped by ``core.naming`` before a
family sees a path; a family only maps paths.
"""
from __future__ import annotations

import re
from typing import ClassVar, Mapping, Optional, Sequence

from ...errors import LoraError
from ..kohya import ATOMS, Vocabulary, underscored
from ..target import Parts, Target

Shapes = Mapping[str, tuple[int, int]]  # LoRA key prefix -> (out rows, in columns) of its layer
# Optional producer prefix before a root-level path in a LoRA key (marks anchor their patterns after it).
ROOT = r"^(?:lora_unet__?|lycoris_|lora_transformer_|diffusion_model\.|transformer\.|unet\.|base_model\.model\.)?"


def root(pattern: str) -> str:
    """A mark pattern that must start the model path (right after any producer prefix)."""
    return ROOT + pattern


class Family:
    """One model family; modules subclass it with data tables and override only what differs."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    roots: ClassVar[tuple[str, ...]] = ()  # first components of the model's own (ComfyUI) paths
    atoms: ClassVar[tuple[str, ...]] = ()  # identifiers with underscores, to re-dot kohya/musubi names
    renames: ClassVar[tuple[tuple[str, str], ...]] = ()  # (regex, replacement): trainer path -> ComfyUI path
    marks: ClassVar[tuple[tuple[str, float], ...]] = ()  # (regex searched in key prefixes, weight)
    metadata: ClassVar[tuple[str, ...]] = ()  # lower-case starts of ss_base_model_version/modelspec.architecture
    encoders: ClassVar[Mapping[str, str]] = {}  # text-encoder key prefix -> canonical encoder
    encoder_out: ClassVar[Mapping[str, Mapping[str, str]]] = {}  # convention -> encoder -> key prefix
    outputs: ClassVar[tuple[str, ...]] = ("kohya", "comfy")  # conventions ComfyUI 0.3.64 loads for it
    diffusers_classes: ClassVar[tuple[str, ...]] = ()  # diffusers ``_class_name`` of its transformer/unet
    unloadable: ClassVar[str] = "it has no key map for them"  # why the host cannot load the refused conventions
    # A base checkpoint in the model's original release names, as ComfyUI's ``process_unet_state_dict`` takes it:
    # a regex that one of its diffusion-model keys matches, and the (old, new) replacements in ComfyUI's order.
    original_base: ClassVar[str] = ""
    original_base_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self) -> None:
        self._vocabulary = Vocabulary(ATOMS + self.atoms)
        self._renames = tuple((re.compile(p), r) for p, r in self.renames)
        self._marks = tuple((re.compile(p), w) for p, w in self.marks)

    # --- reading ---------------------------------------------------------------------------------

    def dotted(self, underscored_path: str) -> str:
        """A kohya/musubi underscored path re-dotted with this family's vocabulary."""
        return self._vocabulary.dotted(underscored_path)

    def renamed(self, path: str) -> str:
        for pattern, replacement in self._renames:
            path = pattern.sub(replacement, path)
        return path

    def unet_target(self, path: str) -> Optional[Target]:
        """The diffusion-model weight a dotted path (any producer prefix removed) changes; None if unknown."""
        path = self.renamed(path)
        return Target(f"diffusion_model.{path}") if path.startswith(self.roots) else None

    def base_key(self, key: str) -> str:
        """A diffusion-model key (``.weight`` included, no prefix) of an original-release base in ComfyUI's names."""
        for old, new in self.original_base_renames:
            key = key.replace(old, new)
        return key

    # --- writing ---------------------------------------------------------------------------------

    def unet_prefix(self, path: str, convention: str) -> str:
        """The key prefix of diffusion-model path ``path`` in ``convention``."""
        if convention == "kohya":
            return "lora_unet_" + underscored(path)  # ComfyUI's generic rule, mapped for every model
        if convention == "comfy":
            return f"diffusion_model.{path}"
        self.check_output(convention)
        peft = self.peft_path(path)
        if peft is None:
            raise LoraError(f"{path} has no {convention} name", layer=f"diffusion_model.{path}",
                            fix="write this LoRA in kohya or ComfyUI format")
        return f"transformer.{peft}"

    def peft_path(self, path: str) -> Optional[str]:
        """The diffusers module path of a ComfyUI path, for families whose PEFT names the host loads."""
        return None

    def split_parts(self, path: str, convention: str) -> Optional[Parts]:
        """The named row slices of a fused weight in a convention that names only its parts."""
        return None

    def fused_rows(self, path: str, offsets: Sequence[tuple[int, int, int]], columns: int) -> Optional[int]:
        """Height of a fused weight whose slices are placed by rows alone (``Target.rows_after``)."""
        return None

    def swapped(self, path: str, convention: str, shape: Optional[tuple[int, ...]] = None) -> bool:
        """Whether ``convention`` names this weight by a module whose output halves are swapped."""
        return False

    def check_output(self, convention: str) -> None:
        """Refuse an output convention ComfyUI cannot load for this family, naming both."""
        if convention in ("keep",) or convention in self.outputs:
            return
        loads = " or ".join(f"-f {c}" for c in self.outputs)
        raise LoraError(f"ComfyUI 0.3.64 cannot load {self.title} LoRAs in {convention} (diffusers) names: "
                        f"{self.unloadable}", fix=f"write it with {loads} (both load in ComfyUI)")

    # --- detection -------------------------------------------------------------------------------

    def score(self, names: Sequence[str], shapes: Shapes) -> float:
        """How strongly these LoRA key prefixes look like this family: the weights of the marks present."""
        return sum(weight for pattern, weight in self._marks if any(pattern.search(n) for n in names))

    def matches_metadata(self, value: str) -> int:
        """Length of the longest metadata start of ours that ``value`` begins with (0: none)."""
        return max((len(m) for m in self.metadata if value.startswith(m)), default=0)
