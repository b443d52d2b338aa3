"""tiktoken.model, Kimi-K2's tokenizer file, read as tiktoken reads it: the same ids as tiktoken
itself on text in several scripts, the special tokens numbered after the base vocabulary, and
a Kimi-K2 checkpoint that ships it and no tokenizer.json converts."""

import base64
import collections
import json

import pytest
import regex
import tiktoken
from checkpoints import load_all
from cli_runs import run
from family_models import CASES, save_family_model

from hcconvert.cli.demo import data_file
from hcconvert.errors import UserError
from hcconvert.model.families import KIMI_TIKTOKEN
from hcconvert.model.tiktoken_vocab import TiktokenVocab, tiktoken_tokenizer

TEXT = ("Hello WORLD, it's   tiktoken's TEST: 12345 + 6789 = 19134!\n\n\tTabs\tand  spaces  \n"
        "中文字符和English混合 — naïve café, ÉCOLE; don'T we'LL 'm\r\n  trailing   ")


def train_ranks(text: str, pattern: str, merges: int) -> dict[bytes, int]:
    """A small tiktoken vocabulary: the 256 bytes, then the most frequent adjacent pair of
    the pattern's pieces, merge after merge (ties broken by the pair's bytes)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = collections.Counter(tuple(bytes([b]) for b in piece.encode())
                                for piece in regex.findall(pattern, text))
    for _ in range(merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        ranks[best[0] + best[1]] = len(ranks)
        words = collections.Counter({_merged(word, best): count for word, count in words.items()})
    return ranks


def _merged(word: tuple, pair: tuple) -> tuple:
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_ranks(path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def test_ids_equal_tiktokens_own(tmp_path):
    corpus = data_file("demo_calib.txt").read_text()[:30_000] + TEXT * 3
    ranks = train_ranks(corpus, KIMI_TIKTOKEN.pattern, 400)
    write_ranks(tmp_path / "tiktoken.model", ranks)
    ours = tiktoken_tokenizer(tmp_path / "tiktoken.model", KIMI_TIKTOKEN, {})
    reference = tiktoken.Encoding("kimi-test", pat_str=KIMI_TIKTOKEN.pattern,
                                  mergeable_ranks=ranks, special_tokens={})
    for text in (TEXT, data_file("demo_eval.txt").read_text()[:20_000]):
        ids = ours.encode(text).ids
        assert ids == reference.encode(text, disallowed_special=())
        assert ours.decode(ids) == text
    assert max(ours.encode(TEXT).ids) > 255  # merges were used, not bytes alone


def test_a_word_held_whole_is_one_token_as_in_tiktoken(tmp_path):
    """tiktoken takes a piece its vocabulary holds as one token, though no merge reaches it
    ("abc" without "ab" or "bc"), and splits special tokens out of text as Kimi's tokenizer
    does (allowed_special="all")."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"zq", b"abc", b"abcabc"):
        ranks[token] = len(ranks)
    write_ranks(tmp_path / "tiktoken.model", ranks)
    vocab = TiktokenVocab(pattern=KIMI_TIKTOKEN.pattern, special_tokens=2)
    ours = tiktoken_tokenizer(tmp_path / "tiktoken.model", vocab, {259: "[BOS]"})
    reference = tiktoken.Encoding("whole", pat_str=vocab.pattern, mergeable_ranks=ranks,
                                  special_tokens={"[BOS]": 259, "<|reserved_token_260|>": 260})
    for text in ("abc abcabc xabc zqabc", "[BOS]abc <|reserved_token_260|> abcab"):
        assert ours.encode(text).ids == reference.encode(text, allowed_special="all")
    assert ours.encode("abc").ids == [257]


def test_special_tokens_follow_the_base_vocabulary(tmp_path):
    write_ranks(tmp_path / "tiktoken.model", {bytes([b]): b for b in range(256)})
    vocab = TiktokenVocab(pattern=r"\S+|\s+", special_tokens=4)
    tokenizer = tiktoken_tokenizer(tmp_path / "tiktoken.model", vocab, {256: "[BOS]", 258: "[EOS]"})
    assert [tokenizer.token_to_id(t) for t in ("[BOS]", "<|reserved_token_257|>", "[EOS]",
                                               "<|reserved_token_259|>")] == [256, 257, 258, 259]
    assert tokenizer.get_vocab_size() == 260
    # Built once: the preflight, calibration and evaluation share it.
    assert tiktoken_tokenizer(tmp_path / "tiktoken.model", vocab,
                              {258: "[EOS]", 256: "[BOS]"}) is tokenizer


def test_kimi_checkpoint_with_tiktoken_model_converts(tmp_path, calib_text):
    case = CASES["kimi_k2"]
    src = save_family_model(case, tmp_path / "src", hub_style=True)
    rows = json.loads((src / "config.json").read_text())["vocab_size"]
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(rows): {"content": "[BOS]", "special": True}}, "auto_map": {
        "AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    # The repos' remote code, which the output needs to load as the source does.
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
                          "AutoModel": "other/repo--modeling_other.Model"}
    (src / "config.json").write_text(json.dumps(config))
    for module in ("tokenization_kimi", "modeling_deepseek", "tool_declaration_ts"):
        (src / f"{module}.py").write_text(f"# {module}\n")  # the last imported by the first
    # The embedding's rows hold the base vocabulary (as Kimi-K2's hold its 163,584 tokens).
    write_ranks(src / "tiktoken.model",
                train_ranks(calib_text.read_text()[:20_000], KIMI_TIKTOKEN.pattern, rows - 256))
    out = tmp_path / "out"
    result = run(src, "--experts", case.reduce_to, "--out", out, "--calib", calib_text,
                 "--calib-samples", 2, "--seq-len", 32)
    assert result.exit_code == 0, result.output
    for name in ("tiktoken.model", "tokenization_kimi.py", "modeling_deepseek.py",
                 "tool_declaration_ts.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == case.reduce_to
    assert load_all(out)


def test_special_token_named_twice_is_refused(tmp_path):
    write_ranks(tmp_path / "tiktoken.model", {bytes([b]): b for b in range(256)})
    with pytest.raises(UserError, match="special token '\\[X\\]' .* a name used twice"):
        tiktoken_tokenizer(tmp_path / "tiktoken.model", TiktokenVocab(r"\S+|\s+", 3),
                           {256: "[X]", 257: "[X]"})


@pytest.mark.parametrize("lines,fragment", [
    ("IQ== 0\nnot-base64! 1\n", "line 2 is not a base64 token and its rank"),
    ("IQ== 0\nIg== 5\n", "does not rank its tokens 0 to 1 once each"),
])
def test_malformed_tiktoken_model_is_refused(tmp_path, lines, fragment):
    (tmp_path / "tiktoken.model").write_text(lines)
    with pytest.raises(UserError, match=fragment):
        tiktoken_tokenizer(tmp_path / "tiktoken.model", KIMI_TIKTOKEN, {})
