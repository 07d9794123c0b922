"""Hugging Face's tokenizer.json (the `tokenizers` library's format) for a T5-layout SentencePiece model."""

import base64

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's ids: data/tokenizer.py trains and checks models with these


def tokenizers_json(proto, extras, user_pieces):
  """tokenizer.json for a sentencepiece unigram model `proto` plus extra ids, with its user pieces {piece: id}."""
  vocab = [[p.piece, p.score] for p in proto.pieces] + [[t, 0.0] for t in reversed(extras)]  # <extra_id_0> last
  specials = [(PAD_ID, "<pad>"), (EOS_ID, "</s>"), (UNK_ID, "<unk>")]
  specials += [(len(vocab) - 1 - i, t) for i, t in enumerate(extras)]
  # User pieces as added tokens: transformers splits them out before the model, as `Tokenizer.encode` does.
  specials += [(i, t) for t, i in user_pieces.items()]
  metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
  charsmap = proto.normalizer_spec.precompiled_charsmap
  return {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [
      {
        "id": i,
        "content": t,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
      }
      for i, t in specials
    ],
    # sentencepiece's normalization rule, compiled into the model (nmt_nfkc for ours).
    "normalizer": {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()}
    if charsmap
    else None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
    "post_processor": {  # an EOS after the text, as `encode(text, add_eos=True)`
      "type": "TemplateProcessing",
      "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
      "pair": [
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": "</s>", "type_id": 0}},
        {"Sequence": {"id": "B", "type_id": 0}},
        {"SpecialToken": {"id": "</s>", "type_id": 0}},
      ],
      "special_tokens": {"</s>": {"id": "</s>", "ids": [EOS_ID], "tokens": ["</s>"]}},
    },
    # Spaces back, byte pieces to characters, the leading space of the first word dropped.
    "decoder": {
      "type": "Sequence",
      "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
      ],
    },
    "model": {"type": "Unigram", "unk_id": UNK_ID, "vocab": vocab, "byte_fallback": proto.trainer_spec.byte_fallback},
  }
