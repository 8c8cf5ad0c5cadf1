"""The run's SentencePiece tokenizer as Hugging Face tokenizer files that encode exactly as lctrain does.

lctrain trains SentencePiece models with the identity normaliser, no dummy prefix and byte fallback
(lctrain.data.tokenizer). The same segmentation in the ``tokenizers`` library: the model's pieces (BPE with its
merges, or Unigram with its scores) behind a Metaspace pre-tokenizer that only maps ' ' to '▁' (never splits,
never prepends), byte fallback on, and a decoder that undoes both. ``tokenizer.json`` holds that pipeline;
``tokenizer_config.json`` names PreTrainedTokenizerFast and the special tokens; the SentencePiece model itself is
copied beside them as ``tokenizer.model``. ``check_same_encoding`` compares AutoTokenizer with lctrain's Tokenizer.
"""
from __future__ import annotations

import json
import pathlib
import shutil

from lctrain.hf.consolidate import ConversionError

SPIECE = "\u2581"
SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "    indented  line\twith tabs\n\n\nand blank lines ",
    "Unicode: h\u00e9llo w\u00f6rld \u4f60\u597d \U0001f600, digits 1234567890 and 3.14159",
    "class Tokenizer:\n    \"\"\"A trained SentencePiece model.\"\"\"\n\n    def encode(self, text: str) -> list[int]:\n",
    " leading space",
    "trailing spaces   ",
]


def _proto(model_path: pathlib.Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


def special_tokens(model_path: pathlib.Path) -> dict[str, tuple[str, int]]:
    """{'unk'|'bos'|'eos'|'pad': (piece, id)} for the special ids the model defines (id -1 = absent)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    return {name: (sp.id_to_piece(i), i) for name, i in ids.items() if i >= 0}


def write_hf_tokenizer(model_path: pathlib.Path, out: pathlib.Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model into ``out``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    proto = _proto(model_path)
    normalizer = proto.normalizer_spec
    if normalizer.name != "identity" or normalizer.remove_extra_whitespaces:
        raise ConversionError(f"tokenizer {model_path} normalises text ({normalizer.name!r}, remove_extra_whitespaces="
                              f"{normalizer.remove_extra_whitespaces}); only identity-normalised SentencePiece models "
                              f"(those lctrain trains) export exactly")
    byte_fallback = proto.trainer_spec.byte_fallback
    kind = proto.trainer_spec.model_type  # 1 unigram, 2 bpe
    specials = special_tokens(model_path)
    if kind == 2:
        from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

        vocab, _, merges = SentencePieceExtractor(str(model_path)).extract()
        model = models.BPE(vocab, merges, unk_token=specials["unk"][0] if "unk" in specials else None, fuse_unk=True,
                           byte_fallback=byte_fallback)
    elif kind == 1:
        pieces = [(p.piece, p.score) for p in proto.pieces]
        model = models.Unigram(pieces, unk_id=specials["unk"][1] if "unk" in specials else None, byte_fallback=byte_fallback)
    else:
        raise ConversionError(f"tokenizer {model_path} is a SentencePiece model of type {kind}; BPE (2) and unigram (1) "
                              f"export")
    tokenizer = Tokenizer(model)
    prepend = "first" if normalizer.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme=prepend, split=False)
    steps = [decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece, _ in specials.values()])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    shutil.copyfile(model_path, out / "tokenizer.model")
    names = {f"{name}_token": piece for name, (piece, _) in specials.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")


def check_same_encoding(model_path: pathlib.Path, hf_dir: pathlib.Path, trust_remote_code: bool) -> None:
    """AutoTokenizer from ``hf_dir`` must give lctrain's ids on the sample texts, and decode them back."""
    from transformers import AutoTokenizer

    from lctrain.data.tokenizer import Tokenizer

    ours = Tokenizer(model_path)
    theirs = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code)
    for text in SAMPLES:
        ids = ours.encode(text)
        got = theirs(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            raise ConversionError(f"the exported tokenizer encodes {text[:30]!r} as {got[:8]}... but lctrain's as "
                                  f"{ids[:8]}...: {model_path} cannot be exported exactly")
        if theirs.decode(ids) != ours.decode(ids):
            raise ConversionError(f"the exported tokenizer decodes {text[:30]!r} differently from lctrain's")
