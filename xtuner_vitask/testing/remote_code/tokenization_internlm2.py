"""InternLM2's tokenizer as InternVL2-2B/8B/26B ship it: a slow (Python) tokenizer over a SentencePiece
model file ``tokenizer.model``, loaded through ``auto_map`` with ``trust_remote_code=True``.

Observable behaviour kept: ``<s>`` is put in front of every encoded text (``add_bos_token=True``), no
``</s>`` at the end; ``bos/eos_token_id`` are the SentencePiece model's own ids; pad is ``</s>``; special
tokens (``<|im_start|>``, ``<|im_end|>``, ``<img>``, ``<IMG_CONTEXT>`` ...) stay whole; decoding puts a
space in front of each text run that a special token ends (and in front of a leading special token) and
always applies transformers' ``clean_up_tokenization``.
"""
import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class InternLM2Tokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 sp_model_kwargs=None, add_bos_token=True, add_eos_token=False, decode_with_prefix_space=False,
                 clean_up_tokenization_spaces=False, **kwargs):
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)  # before super().__init__, which already asks for the vocabulary
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    @property
    def bos_token_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self):
        return self.sp_model.eos_id()

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        specials = set(self.all_special_tokens)
        parts, run, after_special = [], [], False
        for token in tokens:
            if token in specials:  # never through SentencePiece; InternLM2 opens each text run ended by one
                parts += ([] if after_special else [" "]) + [self.sp_model.decode(run), token]  # with a space
                run, after_special = [], True
            else:
                run.append(token)
                after_special = False
        parts.append(self.sp_model.decode(run))
        return self.clean_up_tokenization("".join(parts))

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"vocabulary path {save_directory} should be a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                           + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(out):
                shutil.copyfile(self.vocab_file, out)
        else:
            with open(out, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out,)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        output = ([self.bos_token_id] if self.add_bos_token else []) + token_ids_0
        if token_ids_1 is not None:
            output = output + token_ids_1
        if self.add_eos_token:
            output = output + [self.eos_token_id]
        return output

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        if token_ids_1 is None:
            return [1] + [0] * len(token_ids_0) + [1]
        return [1] + [0] * len(token_ids_0) + [1, 1] + [0] * len(token_ids_1) + [1]

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        if token_ids_1 is None:
            return [0] * (len(token_ids_0) + 1)
        return [0] * (len(token_ids_0) + len(token_ids_1) + 2)
