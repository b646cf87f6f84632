#!/usr/bin/env python3
"""Reference ids for the byte-level BPE tokenizer (include/peft/data/tokenizer.hpp), from the
reference `tokenizers` package (pip install tokenizers), on GPT-2's vocab.json and merges.txt.

Writes tests/data/tokenizer/:
  cases.json              the texts; for each variant their ids (encode with special tokens)
                          and the reference's decode of those ids (null: the text itself)
  <variant>.shell.json    the variant's tokenizer.json as tokenizers writes it, with
                          model.vocab and model.merges emptied (the test puts GPT-2's back in:
                          the full files are 2 MB each); this script checks that shell + vocab +
                          merges is exactly what tokenizers wrote

Variants: gpt2_files (vocab.json + merges.txt, BPE.from_file with the ByteLevel pre-tokenizer),
gpt2 (a tokenizer.json with <|endoftext|> special), gpt2_added (added tokens with single_word,
lstrip, rstrip, normalized), prefix_space (ByteLevel add_prefix_space), llama3 (the LLaMA-3
split pattern, ignore_merges, a <|begin_of_text|> template), qwen2 (the Qwen2 pattern).

usage: python scripts/gen_tokenizer_cases.py [GPT2_DIR]   (default ../shared/data/gpt2)
"""
import json
import pathlib
import random
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/data/tokenizer"

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
         r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Each alternative of the patterns, and the text a user feeds: contractions (both cases),
# whitespace runs of every kind, digits, punctuation, non-Latin scripts, emoji.
TEXTS = [
    "Hello world",
    "Hello, world! How's it going? I'm fine; they'll see, we'd go, you're here, I've been.",
    "DON'T SHOUT: IT'S, THEY'LL, WE'D, YOU'RE, I'VE, I'M. Mixed 'Re 'Ll 'S 'T 'D 'M.",
    "'s 't 're 've 'm 'll 'd '' ''s x's",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\t\tnew\nlines\n\n\nand\r\nCRLF\r\n\r\n",
    "   \n  \t \n",
    "a  b   c    d     e",
    " ",
    "\n",
    "x \n y\n\n z  \r\n",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 007 ٣٤٥ ⅷ ½ ²",
    "punctuation!!! ??? ... --- *** ((()))[]{}<>@#$%^&*_+=|\\/~`\"'",
    " !x ?y .z ,, ;; ::",
    "Ünïcödé: café naïve façade résumé Straße ŒUVRE ſ 'ſ",
    "Русский текст, Ελληνικά, עברית, العربية, हिन्दी, ไทย",
    "中文文本，日本語のテキスト、한국어 텍스트。",
    "emoji 😀😃 👍🏽 👨‍👩‍👧‍👦 🇩🇪 ❤️ ✨🔥",
    "non-breaking\u00a0space, ideographic\u3000space, next line\u0085, em\u2003space",
    "control \x1c\x1d\x1e\x1f chars \x00 and \x7f",
    "mixed123abc 4you abc4 a1b2c3 ١٢٣abc",
    "url https://example.com/path?q=1&r=2#frag and email a.b@c.de",
    "code: def f(x):\n    return x**2  # comment\n\tpass\n",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> spaced<|endoftext|><|endoftext|>",
    "<mask> masked <mask>token foo foobar foo_bar (foo) [SEP]x x[SEP] <|begin_of_text|>hi",
    "foo½ foo² foo٣ fooⅫ foo\u0301 foo\u200d foo‿ Ⓐfoo foo-foo foo·",
    "ℌ𝔢𝔩𝔩𝔬 𝕎𝕠𝕣𝕝𝕕 ＦＵＬＬＷＩＤＴＨ",
    "a" * 300,
    "The quick brown fox jumps over the lazy dog. " * 8,
]


def random_texts(count, seed):
    """Mixtures of the pieces the patterns and the added tokens care about, and one code point
    in five drawn from all of Unicode's planes 0-2 (which finds a scanner whose Unicode tables are
    older than the reference's)."""
    rng = random.Random(seed)
    pool = list("abcXYZ019 '\t\n\r\x0b\x0c.,!?-_") + [
        "  ", "'s", "'LL", "'Re", "'ve", "\u00a0", "\u3000", "\u2028", "\u0085", "é", "ß", "ſ",
        "'ſ", "中", "😀", "٣", "½", "Ⅻ", "\u0301", "<mask>", "<|endoftext|>", "<|begin_of_text|>",
        "foo", "[SEP]", "\r\n", " \n", "\n ", "1234567"]

    def any_code_point():
        while True:
            cp = rng.randint(0, 0x2FFFF)
            if not 0xD800 <= cp <= 0xDFFF:
                return chr(cp)

    return ["".join(rng.choice(pool) if rng.random() < 0.8 else any_code_point()
                    for _ in range(rng.randint(1, 60))) for _ in range(count)]


def base_bpe(gpt2, **kw):
    vocab, merges = BPE.read_file(str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt"))
    return BPE(vocab, merges, **kw)


def byte_level(tok, add_prefix_space=False):
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    return tok


def variants(gpt2):
    out = {}
    out["gpt2_files"] = byte_level(Tokenizer(base_bpe(gpt2)))
    t = byte_level(Tokenizer(base_bpe(gpt2)))
    t.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    out["gpt2"] = t
    t = byte_level(Tokenizer(base_bpe(gpt2)))
    t.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    t.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False),
                  AddedToken("foo", single_word=True),
                  AddedToken("[SEP]", normalized=True),
                  AddedToken("foobar")])
    out["gpt2_added"] = t
    out["prefix_space"] = byte_level(Tokenizer(base_bpe(gpt2)), add_prefix_space=True)
    for name, pattern in (("llama3", LLAMA3), ("qwen2", QWEN2)):
        t = Tokenizer(base_bpe(gpt2, ignore_merges=(name == "llama3")))
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        t.decoder = decoders.ByteLevel()
        t.add_special_tokens([AddedToken("<|begin_of_text|>", special=True, normalized=False)])
        bos = t.token_to_id("<|begin_of_text|>")
        t.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
        out[name] = t
    return out


def main():
    gpt2 = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "../shared/data/gpt2").resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    texts = TEXTS + random_texts(400, 20261201)
    vocab = json.loads((gpt2 / "vocab.json").read_text(encoding="utf-8"))
    cases = {"tokenizers_version": __import__("tokenizers").__version__, "texts": texts,
             "variants": {}}
    for name, tok in variants(gpt2).items():
        ids = [tok.encode(text).ids for text in texts]
        # The reference's decode of the ids; null where it is the text itself.
        decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
        decoded = [None if d == t else d for d, t in zip(decoded, texts)]
        cases["variants"][name] = {"ids": ids, "decoded": decoded}
        if name == "gpt2_files":
            continue
        full = json.loads(tok.to_str())
        shell = json.loads(tok.to_str())
        merges = shell["model"]["merges"]
        shell["model"]["vocab"] = {}
        shell["model"]["merges"] = []
        assert full["model"]["vocab"] == vocab, name
        lines = [ln for ln in (gpt2 / "merges.txt").read_text(encoding="utf-8").split("\n")
                 if ln and not ln.startswith("#version")]
        assert [" ".join(m) if isinstance(m, list) else m for m in merges] == lines, name
        (OUT / f"{name}.shell.json").write_text(json.dumps(shell, indent=1, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    (OUT / "cases.json").write_text(json.dumps(cases, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(texts)} texts x {len(cases['variants'])} variants", file=sys.stderr)


if __name__ == "__main__":
    main()
