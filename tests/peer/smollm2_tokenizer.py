"""SmolLM2's own tokenizer pipeline, as its tokenizer.json and llama.cpp's "smollm"
pre-tokenizer have it (Digits(individual_digits) then ByteLevel), built with the `tokenizers`
package from a GGUF file's vocabulary and merges (read with the `gguf` package).
transformers' GGUF conversion leaves the Digits stage out; the peer test and the fixture
script use this one as the reference for lqd's tokenization."""


def own_tokenizer(gguf_path):
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    fields = gguf.GGUFReader(gguf_path).fields

    def strings(key):
        return [bytes(fields[key].parts[i]).decode() for i in fields[key].data]

    vocab = {piece: i for i, piece in enumerate(strings("tokenizer.ggml.tokens"))}
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer
