"""A sentencepiece model proto rebuilt as an equivalent `tokenizers.Tokenizer` (tokenizer.json).

Why this is exact for the models `tokenizer.train_tokenizer` writes (checked against
sentencepiece on a mixed Chinese/English/emoji corpus in tests/data/test_hf_tokenizer.py):
  - normalisation is the identity and whitespace is kept, so the only rewrites are " " ->
    "▁" and the dummy-prefix "▁" in front of the text when the model adds one (LLaMA 2);
    there is no pre-tokenizer: sentencepiece runs BPE over the whole text too;
  - sentencepiece BPE repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring piece. A `tokenizers` BPE gets one merge per (left, right) split of each
    normal piece whose halves are normal pieces, ranked by the piece's score, so it picks
    the same pair;
  - characters outside the vocabulary become <0xNN> byte pieces in both (byte_fallback);
  - user-defined pieces (our "\\n") are matched before BPE in both (added tokens);
  - digits never merge: no piece holds two digits when trained with split_digits.
Unigram models map onto `tokenizers.models.Unigram` with the same scores.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

# sentencepiece ModelProto.SentencePiece.Type values.
_NORMAL, _UNKNOWN, _CONTROL, USER_DEFINED = 1, 2, 3, 4
SPECIAL_KINDS = (_CONTROL, _UNKNOWN)  # pieces never produced from text: pad, unk, bos, eos
_BPE, _UNIGRAM = 2, 1  # sentencepiece TrainerSpec.ModelType values


def parse_proto(proto: bytes) -> spm_pb2.ModelProto:
    """The ModelProto of a serialised `.model` file (bytes); ValueError if it is not one."""
    model = spm_pb2.ModelProto()
    try:
        model.ParseFromString(proto)
    except DecodeError as err:
        raise ValueError(f"not a sentencepiece model proto: {err}") from err
    return model


def _check_convertible(model: spm_pb2.ModelProto, where: str) -> None:
    norm = model.normalizer_spec
    problems = []
    if model.trainer_spec.model_type not in (_BPE, _UNIGRAM):
        problems.append("model type is neither BPE nor unigram")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalisation {norm.name!r} is not the identity")
    if norm.remove_extra_whitespaces:
        problems.append("it removes extra whitespace")
    if not model.trainer_spec.byte_fallback:
        problems.append("it has no byte fallback")
    if problems:
        raise ValueError(f"sentencepiece model {where} cannot be written as an exact "
                         f"tokenizer.json: {'; '.join(problems)}")


def _bpe_merges(model: spm_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best piece first."""
    normal = {p.piece for p in model.pieces if p.type == _NORMAL}
    ranked = []
    for index, p in enumerate(model.pieces):
        if p.type != _NORMAL:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in normal and right in normal:
                ranked.append((-p.score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _model(model: spm_pb2.ModelProto) -> models.Model:
    unk_id = next(i for i, p in enumerate(model.pieces) if p.type == _UNKNOWN)
    if model.trainer_spec.model_type == _UNIGRAM:
        return models.Unigram([(p.piece, p.score) for p in model.pieces], unk_id,
                              byte_fallback=True)
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    return models.BPE(vocab, _bpe_merges(model), unk_token=model.pieces[unk_id].piece,
                      fuse_unk=True, byte_fallback=True)


def tokenizer_from_proto(proto: bytes, where: str, *, parse_special: bool = False
                         ) -> Tokenizer:
    """The `tokenizers.Tokenizer` that encodes and decodes like the sentencepiece model.

    Control and unknown pieces become special added tokens, user-defined pieces ordinary
    added tokens.

    Args:
        proto: the serialised `.model` (bytes).
        where: its path, for error messages.
        parse_special: False: callers encode text whole, special-token strings such as "<s>"
            included (they set `encode_special_tokens`), and a dummy-prefix model gets "▁" in
            front of the text as sentencepiece does (a Prepend normaliser). True: "<s>" in
            text is read as its id, and only text at the very start gets the prefix, unless it
            starts with a space (a Metaspace "first" pre-tokenizer, as transformers' LLaMA
            tokenizer does).

    Raises:
        ValueError: naming `where`, for a model whose normalisation this cannot reproduce.
    """
    model = parse_proto(proto)
    _check_convertible(model, where)
    tok = Tokenizer(_model(model))
    dummy_prefix = model.normalizer_spec.add_dummy_prefix
    if parse_special:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if dummy_prefix else "never", split=False)
    else:
        steps = [normalizers.Prepend("▁")] if dummy_prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in model.pieces if p.type in SPECIAL_KINDS])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in model.pieces if p.type == USER_DEFINED])
    bos_id = model.trainer_spec.bos_id
    if bos_id >= 0:
        bos = model.pieces[bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tok
