"""Tokenizer files for lqd's tokenizer tests, made from the ones in ../shared:

- a SentencePiece tokenizer.model from a llama2.c tokenizer.bin (ids 0-2 <unk> <s> </s>,
  <0xNN> byte pieces, spaces back to "▁"), with the settings llama2.c's encoder assumes;
- an HF tokenizer.json from a SentencePiece model, as transformers' LlamaConverter makes it
  (transformers 4.57, convert_slow_tokenizer.py): vocab in id order, merges from every split
  of every piece ordered by the piece's score, byte_fallback, legacy normalizer Prepend "▁" +
  Replace " " -> "▁" (or, with legacy=False, a Metaspace pre-tokenizer), BOS template.

Run as a script it writes the small tok512 fixtures of tests/unit/data (checked in):
  .venv/bin/python tests/peer/tokenizer_fixtures.py models/stories260K/tok512.bin tests/unit/data
Needs sentencepiece (protobuf model) and tokenizers (tokenizer.json)."""
import json
import os
import struct
import sys

SPACE = "\u2581"


def read_llama2c_bin(path):
    """(max_token_length, [(piece bytes, score)]) of a llama2.c tokenizer.bin."""
    with open(path, "rb") as f:
        data = f.read()
    (max_length,) = struct.unpack_from("<i", data, 0)
    at, pieces = 4, []
    while at < len(data):
        score, length = struct.unpack_from("<fi", data, at)
        at += 8
        pieces.append((data[at:at + length], score))
        at += length
    return max_length, pieces


def model_from_llama2c_bin(path):
    """Serialized SentencePiece ModelProto equivalent to a llama2.c tokenizer.bin."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    _, pieces = read_llama2c_bin(path)
    model = pb.ModelProto()
    for i, (raw, score) in enumerate(pieces):
        text = raw.decode("utf-8")
        piece = model.pieces.add()
        if i == 0 and text == "<unk>":
            piece.piece, piece.type = text, 2
        elif i in (1, 2) and text.strip("\n") in ("<s>", "</s>"):
            piece.piece, piece.type = text.strip("\n"), 3
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            piece.piece, piece.type = text, 6
        else:
            piece.piece, piece.type = text.replace(" ", SPACE), 1
        piece.score = score
    spec = model.trainer_spec
    spec.model_type = 2  # BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False  # llama2.c's encode keeps every space
    norm.escape_whitespaces = True
    return model.SerializeToString()


def generate_merges(vocab, vocab_scores):
    """transformers' generate_merges: every split of a piece into two pieces, best score first."""
    scores = dict(vocab_scores)
    merges = []
    for merge, piece_score in scores.items():
        local = []
        for index in range(1, len(merge)):
            left, right = merge[:index], merge[index:]
            if left in vocab and right in vocab:
                local.append((left, right, piece_score))
        local = sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges = sorted(merges, key=lambda val: (val[2], len(val[0]), len(val[1])), reverse=True)
    return [(val[0], val[1]) for val in merges]


def json_from_model(model_bytes, legacy=True):
    """tokenizer.json text for a SentencePiece BPE model, as LlamaTokenizerFast saves it."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = pb.ModelProto()
    model.ParseFromString(model_bytes)
    vocab_scores = [(p.piece, p.score) for p in model.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
    merges = generate_merges(vocab, vocab_scores)
    unk = model.trainer_spec.unk_piece or "<unk>"
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    special = [p.piece for p in model.pieces if p.type in (2, 3)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [p.piece for p in model.pieces if p.type == 4]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    if legacy:
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(prepend=SPACE), normalizers.Replace(pattern=" ", content=SPACE)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE, prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1)])
    bos = model.trainer_spec.bos_piece or "<s>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, vocab[bos])])
    return tokenizer.to_str()


def main(argv):
    if len(argv) != 3:
        print(__doc__)
        return 2
    source, out_dir = argv[1], argv[2]
    base = os.path.splitext(os.path.basename(source))[0]
    model = model_from_llama2c_bin(source)
    with open(os.path.join(out_dir, base + ".model"), "wb") as f:
        f.write(model)
    text = json_from_model(model)
    with open(os.path.join(out_dir, base + ".json"), "w", encoding="utf-8") as f:
        json.dump(json.loads(text), f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
