"""Build a small, real, multilingual + code text corpus and a byte-level BPE tokenizer.

Everything comes from files that Debian packages (or the Python installation) put on
disk; nothing is downloaded at run time.

Sources (one "document" = one file):

* ``code``: the top-level ``*.py`` modules of the Python standard library of the running
  interpreter (``sysconfig.get_paths()["stdlib"]``, e.g.
  ``/root/.pyenv/versions/3.11.7/lib/python3.11/*.py``).
* ``c``: C header files under ``/usr/include`` (the C library's and the kernel's, from
  ``libc6-dev`` and ``linux-libc-dev``): a second programming language.
* ``en``, ``de``, ``fr``, ``es``, ``pl``: manual pages shipped by the Debian packages
  ``manpages`` (English, Linux man-pages project) and ``manpages-de`` / ``-fr`` / ``-es`` /
  ``-pl`` (translations by the manpages-l10n project). The roff markup is converted to plain
  text by a small built-in converter (no groff needed), so the output does not depend on
  the installed groff version. Only the non-symlink ``.gz`` pages listed by
  ``dpkg -L PACKAGE`` are used; ``.so`` redirects and mdoc pages are skipped.

Install (Debian 12 "bookworm"; about 7 MB of downloads)::

    apt-get update
    apt-get install -y --no-install-recommends manpages manpages-de manpages-fr manpages-es \
        manpages-pl

Note: Debian's slim Docker images may exclude ``/usr/share/man`` via
``/etc/dpkg/dpkg.cfg.d/``; this script fails loudly if a package's pages are missing.

Outputs (default ``bench-out/corpus/``)::

    train.txt        training text, documents separated by a blank line
    calib.jsonl      calibration samples, one {"text": ..., "source": ...} per line
    eval.txt         held-out text (documents disjoint from train and calib)
    eval-SOURCE.txt, calib-SOURCE.jsonl   the same, one source each (per-domain evaluation,
                     calibration on one domain)
    manifest.json    package versions, per-source/per-split document and byte counts, sha256
    tokenizer/tokenizer.json, tokenizer/tokenizer_config.json, tokenizer/special_tokens_map.json

Splits are made per source (stratified) after shuffling that source's files with a fixed
seed, so all three splits have the same mix of code and languages; a file goes to exactly
one split. In eval and calib a file contributes at most ``--max-doc-chars`` characters (so
that a few huge files cannot dominate them); train files are used whole.

Rebuild::

    .venv/bin/python bench/corpus.py --out bench-out/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

BOS = "<s>"
EOS = "</s>"

MAN_SOURCES = {
    "en": "manpages",
    "de": "manpages-de",
    "fr": "manpages-fr",
    "es": "manpages-es",
    "pl": "manpages-pl",
}
APT_INSTALL = (
    "apt-get update && apt-get install -y --no-install-recommends "
    + " ".join(MAN_SOURCES.values())
)

# ----------------------------------------------------------------------------- roff -> text

_GLYPHS = {
    "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019",
    "Aq": "'", "L\"": "\u201c", "R\"": "\u201d", "C'": "'", "C`": "`", "C+": "C++",
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "--": "\u2014", "bu": "\u2022",
    "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "Tm": "\u2122", "R": "\u00ae",
    "ha": "^", "ti": "~", "rs": "\\", "sl": "/", "at": "@", "sh": "#", "Do": "$", "ba": "|",
    "bv": "|", "or": "|", "ga": "`", "aa": "\u00b4", "de": "\u00b0", "char176": "\u00b0",
    "+-": "\u00b1", "mu": "\u00d7", "di": "\u00f7", "pl": "+", "eq": "=", "fm": "\u2032",
    "sd": "\u2033", "dg": "\u2020", "pd": "\u2202", "is": "\u222b", "if": "\u221e",
    ">=": "\u2265", "<=": "\u2264", "!=": "\u2260", "==": "\u2261", "->": "\u2192",
    "<-": "\u2190", "ra": "\u27e9", "la": "\u27e8", "Fo": "\u00ab", "Fc": "\u00bb",
    "fo": "\u2039", "fc": "\u203a", "12": "\u00bd", "14": "\u00bc", "34": "\u00be",
    "sc": "\u00a7", "ps": "\u00b6", "ct": "\u00a2", "Po": "\u00a3", "Eu": "\u20ac",
    "eu": "\u20ac", "mc": "\u00b5", "*W": "\u03a9", "*b": "\u03b2", "*p": "\u03c0",
    "*i": "\u03b9", "*a": "\u03b1", "*l": "\u03bb", "*m": "\u03bc", "*s": "\u03c3",
    "ss": "\u00df", "number": "#", "shc": "\u00ad", "ul": "_", "ci": "\u25cb",
    "PI": "\u03c0", "Am": "&", "Gt": ">", "Lt": "<", "Le": "\u2264", "Ge": "\u2265",
    "Sd": "\u2033", "Tr": "\u2122", "Dt": "\u00a8", "md": "\u22c5", "pc": "\u00b7",
}
_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303",
            ",": "\u0327", "o": "\u030a", "v": "\u030c"}


def _glyph(name: str) -> str:
    if name in _GLYPHS:
        return _GLYPHS[name]
    if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
        return chr(int(name[1:], 16))
    if name.startswith("char") and name[4:].isdigit():
        return chr(int(name[4:]))
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
        import unicodedata

        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if len(name) == 2 and name[0] == "/" and name[1] in "OoLl":
        return {"O": "\u00d8", "o": "\u00f8", "L": "\u0141", "l": "\u0142"}[name[1]]
    return ""


_ESCAPE_RE = re.compile(
    r"""\\(?:
        \((?P<g2>..)                     # \(xx glyph
      | \[(?P<gb>[^\]]*)\]               # \[name] glyph
      | \*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.))   # \*x string
      | f(?:\(..|\[[^\]]*\]|.)           # font change
      | s(?:[-+]?\d\d?|\([-+]?\d\d|\[[^\]]*\]|'[^']*')  # size change
      | n(?:\(..|\[[^\]]*\]|[-+]?.)     # number register
      | [hvwlLoXNSbDxRZ]'[^']*'          # escapes with a delimited argument
      | [kmgzFM](?:\(..|\[[^\]]*\]|.)   # escapes with a name argument
      | (?P<c>.)                         # any other single char escape
    )""",
    re.VERBOSE,
)
_SIMPLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t",
           "'": "\u00b4", "`": "`", ".": ".", '"': ""}


def _unescape(s: str) -> str:
    def sub(m: re.Match) -> str:
        for grp in ("g2", "gb", "s2", "sb", "s1"):
            v = m.group(grp)
            if v is not None:
                return _glyph(v)
        c = m.group("c")
        if c is None:
            return ""
        if c in _SIMPLE:
            return _SIMPLE[c]
        if c in "&:|^,/)%cdupraEC{}":
            return ""
        return c

    return _ESCAPE_RE.sub(sub, s)


def _macro_args(rest: str) -> list[str]:
    """Split a macro's argument string like roff does (double quotes group words)."""
    args, cur, inq, i = [], [], False, 0
    while i < len(rest):
        ch = rest[i]
        if ch == "\\" and i + 1 < len(rest):
            cur.append(rest[i:i + 2])
            i += 2
            continue
        if ch == '"':
            if inq and i + 1 < len(rest) and rest[i + 1] == '"':
                cur.append('"')
                i += 2
                continue
            inq = not inq
        elif ch in " \t" and not inq:
            if cur:
                args.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
        i += 1
    if cur:
        args.append("".join(cur))
    return args


_BREAK_MACROS = {"PP", "LP", "P", "sp", "Sp", "HP", "TP", "IP", "SH", "SS", "br", "EX", "EE",
                 "nf", "fi", "RS", "RE", "in", "TQ", "Vb", "Ve", "INDENT", "UNINDENT", "SY",
                 "YS", "ti"}
_FONT_MACROS = {"B", "I", "SM", "SB", "R", "UE", "ME", "UR", "MT", "OP"}
_ALT_MACROS = {"BR", "RB", "IR", "RI", "BI", "IB"}


def roff_to_text(src: str, width: int = 79) -> str:
    """Convert man(7) roff source to plain text (approximate, deterministic)."""
    out: list[str] = []  # finished lines
    para: list[str] = []  # words of the current filled paragraph
    nofill = False
    tp_tag = False  # the next text line is a .TP tag: put it on a line of its own
    skip_until: str | None = None
    in_table = table_fmt = False

    def flush(blank: bool = False) -> None:
        if para:
            text = " ".join(para)
            text = re.sub(r"[ \t]+", " ", text).strip()
            if text:
                out.extend(textwrap.wrap(text, width=width, break_long_words=False,
                                         break_on_hyphens=False) or [""])
            para.clear()
        if blank and out and out[-1] != "":
            out.append("")

    def emit_text(text: str) -> None:
        nonlocal tp_tag
        if nofill:
            out.append(text.rstrip())
        elif text.strip():
            para.append(text.strip())
            if tp_tag:
                tp_tag = False
                flush(False)

    for raw in src.split("\n"):
        line = raw
        if skip_until is not None:
            if line.strip() == skip_until:
                skip_until = None
            continue
        # comments
        if re.match(r"^[.']\s*\\\"", line) or line.startswith("'''") or line in (".", "'"):
            continue
        line = re.sub(r'\\".*$', "", line)
        if in_table:
            s = line.strip()
            if s.startswith(".TE"):
                in_table = False
                nofill = False
                flush(True)
                continue
            if table_fmt:
                if s.endswith("."):
                    table_fmt = False
                continue
            if s in ("_", "=", "T{", "T}") or s.startswith("."):
                continue
            s = s.replace("T{", "").replace("T}", "")
            cells = [_unescape(c).strip() for c in s.split("\t")]
            out.append("  ".join(c for c in cells if c))
            continue
        if line.startswith(".") or line.startswith("'"):
            m = re.match(r"^[.']\s*(\S+)\s*(.*)$", line)
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            if name in ("de", "de1", "am", "ig"):
                skip_until = ".."
                continue
            if name == "TS":
                flush(True)
                in_table = table_fmt = True
                # a table may have an options line ending with ';' before the format
                continue
            if name in ("SH", "SS"):
                flush(True)
                title = _unescape(" ".join(_macro_args(rest)))
                if title:
                    out.append(title)
                continue
            if name in ("TH", "so", "Dd"):
                continue
            if name in _BREAK_MACROS:
                if name in ("nf", "EX", "Vb"):
                    flush(name != "nf")
                    nofill = True
                elif name in ("fi", "EE", "Ve"):
                    flush(name != "fi")
                    nofill = False
                elif name in ("br", "in", "ti", "RS", "RE", "TQ"):
                    flush(False)
                else:
                    flush(True)
                tp_tag = name in ("TP", "TQ")
                if name == "IP":
                    args = _macro_args(rest)
                    if args and args[0].strip():
                        emit_text(_unescape(args[0]))
                        flush(False)
                continue
            if name in _FONT_MACROS:
                args = _macro_args(rest)
                if name in ("UR", "MT", "UE", "ME"):
                    args = [a for a in args if a] if name in ("UE", "ME") else []
                if name == "OP":
                    args = ["[" + " ".join(args) + "]"] if args else []
                if args:
                    emit_text(_unescape(" ".join(args)))
                continue
            if name in _ALT_MACROS:
                emit_text(_unescape("".join(_macro_args(rest))))
                continue
            if name == "URL":
                args = _macro_args(rest)
                emit_text(_unescape(" ".join(args[1:2] or args[:1]) + " ".join(args[2:3])))
                continue
            # anything else (.if .ie .el .ds .nr .ad .nh .hy .PD .IX .ll .ft .ne mdoc ...)
            continue
        text = _unescape(line)
        if not nofill and not text.strip():
            flush(True)
            continue
        emit_text(text)
    flush(False)
    text = "\n".join(out).strip("\n")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text + "\n"


# ----------------------------------------------------------------------------- sources


def _dpkg_files(package: str) -> list[str]:
    try:
        res = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"package {package!r} is not installed; run:\n  {APT_INSTALL}"
        ) from exc
    files = []
    for f in res.stdout.splitlines():
        if "/man/" in f and f.endswith(".gz") and os.path.isfile(f) and not os.path.islink(f):
            files.append(f)
    if not files:
        raise SystemExit(
            f"package {package!r} has no man pages on disk (dpkg path-exclude?); run:\n"
            f"  {APT_INSTALL}"
        )
    return sorted(files)


def _dpkg_version(package: str) -> str | None:
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                             capture_output=True, text=True, check=True)
        return res.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def load_man_docs(package: str) -> list[tuple[str, str]]:
    docs = []
    for path in _dpkg_files(package):
        with gzip.open(path, "rb") as fh:
            src = fh.read().decode("utf-8", errors="replace")
        head = src.lstrip()[:400]
        if head.startswith(".so ") or re.search(r"^\.Dd\b", src, re.M):
            continue  # redirect or mdoc page
        text = roff_to_text(src)
        if len(text) >= 200:
            docs.append((path, text))
    return docs


def load_code_docs(root: str, pattern: str) -> list[tuple[str, str]]:
    """Source files under root matching pattern (`*.py`, `**/*.h`), one document each."""
    docs = []
    for path in sorted(Path(root).glob(pattern)):
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= 200:
            docs.append((str(path), text.rstrip("\n") + "\n"))
    if not docs:
        raise SystemExit(f"no {pattern} files under {root}")
    return docs


# ----------------------------------------------------------------------------- splitting


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1 if cut > max_chars // 2 else max_chars]


def _chunks(text: str, max_chars: int) -> list[str]:
    """Split text at line boundaries into pieces of at most ~max_chars."""
    pieces, cur, size = [], [], 0
    for ln in text.splitlines(keepends=True):
        if cur and size + len(ln) > max_chars:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(ln)
        size += len(ln)
    if cur:
        pieces.append("".join(cur))
    return [p for p in pieces if p.strip()]


def split_source(docs, rng, eval_chars, calib_chars, train_chars, max_doc_chars):
    docs = list(docs)
    rng.shuffle(docs)
    ev, ca, tr = [], [], []
    n_ev = n_ca = n_tr = 0
    for path, text in docs:
        if n_ev < eval_chars:
            t = _truncate(text, max_doc_chars)
            ev.append((path, t))
            n_ev += len(t)
        elif n_ca < calib_chars:
            t = _truncate(text, max_doc_chars)
            ca.append((path, t))
            n_ca += len(t)
        elif n_tr < train_chars:
            tr.append((path, text))
            n_tr += len(text)
    return ev, ca, tr


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_file: Path, out_dir: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS} $B",
            special_tokens=[(BOS, bos_id), (EOS, eos_id)],
        ),
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS}, indent=2) + "\n")
    check = Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode("def f(x): return x")
    assert check.ids[0] == bos_id, "post-processor must prepend BOS"
    return out_dir


# ----------------------------------------------------------------------------- main


def write_jsonl(path: Path, records: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for src, t in records:
            fh.write(json.dumps({"text": t, "source": src}, ensure_ascii=False) + "\n")


def build(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = args.stdlib or sysconfig.get_paths()["stdlib"]
    sources: dict[str, list[tuple[str, str]]] = {"code": load_code_docs(stdlib, "*.py"),
                                                 "c": load_code_docs(args.include, "**/*.h")}
    for lang in args.langs:
        sources[lang] = load_man_docs(MAN_SOURCES[lang])

    n_src = len(sources)
    splits: dict[str, list[tuple[str, str, str]]] = {"eval": [], "calib": [], "train": []}
    stats: dict[str, dict] = {}
    for name in sorted(sources):
        rng = random.Random(f"{args.seed}:{name}")
        ev, ca, tr = split_source(
            sources[name], rng,
            eval_chars=args.eval_kb * 1000 // n_src,
            calib_chars=args.calib_kb * 1000 // n_src,
            train_chars=args.train_mb_per_source * 1_000_000,
            max_doc_chars=args.max_doc_chars,
        )
        stats[name] = {
            "available_docs": len(sources[name]),
            "available_chars": sum(len(t) for _, t in sources[name]),
        }
        for split, docs in (("eval", ev), ("calib", ca), ("train", tr)):
            splits[split].extend((name, p, t) for p, t in docs)
            stats[name][split] = {"docs": len(docs), "chars": sum(len(t) for _, t in docs)}

    rng = random.Random(args.seed)
    for split in splits:
        rng.shuffle(splits[split])

    def write_txt(fname: str, docs) -> None:
        with open(out / fname, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("\n".join(t for _, _, t in docs))

    write_txt("train.txt", splits["train"])
    write_txt("eval.txt", splits["eval"])
    records = [(src, t) for src, _, doc in splits["calib"]
               for t in _chunks(doc, args.calib_chunk_chars)]
    rng.shuffle(records)
    write_jsonl(out / "calib.jsonl", records)
    for name in sources:
        write_txt(f"eval-{name}.txt", [d for d in splits["eval"] if d[0] == name])
        write_jsonl(out / f"calib-{name}.jsonl", [r for r in records if r[0] == name])

    # sanity: no document in two splits
    seen: dict[str, str] = {}
    for split, docs in splits.items():
        for _, p, _ in docs:
            assert p not in seen, f"{p} in {seen[p]} and {split}"
            seen[p] = split

    tok_dir = train_tokenizer(out / "train.txt", out / "tokenizer", args.vocab_size)

    manifest = {
        "seed": args.seed,
        "python": sys.version.split()[0],
        "stdlib": stdlib,
        "packages": {p: _dpkg_version(p) for lang, p in MAN_SOURCES.items() if lang in args.langs},
        "apt_install": APT_INSTALL,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "sources": stats,
        "files": {
            f: {"bytes": (out / f).stat().st_size, "sha256": _sha256(out / f)}
            for f in ("train.txt", "calib.jsonl", "eval.txt", "tokenizer/tokenizer.json")
        },
        "calib_records": len(records),
        "split_docs": {s: [p for _, p, _ in d] for s, d in splits.items() if s != "train"},
        "tokenizer_dir": str(tok_dir),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out/corpus")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--langs", nargs="+", default=["en", "de", "fr", "es", "pl"],
                    choices=sorted(MAN_SOURCES))
    ap.add_argument("--stdlib", default=None, help="dir with Python *.py (default: this Python)")
    ap.add_argument("--include", default="/usr/include", help="dir with C headers")
    # Per source about 40 kB held out (~12k tokens) and 300 kB of calibration text (~90k
    # tokens: enough to calibrate on one domain with 65k tokens).
    ap.add_argument("--eval-kb", type=int, default=280, help="held-out size (all sources)")
    ap.add_argument("--calib-kb", type=int, default=2100, help="calibration size (all sources)")
    ap.add_argument("--train-mb-per-source", type=float, default=2.0)
    ap.add_argument("--max-doc-chars", type=int, default=5000,
                    help="a file contributes at most this much to eval/calib")
    ap.add_argument("--calib-chunk-chars", type=int, default=4000)
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args(argv)
    m = build(args)
    out = Path(args.out)
    print(f"corpus written to {out}/")
    for name, st in m["sources"].items():
        print(f"  {name:5s} docs={st['available_docs']:4d} "
              + " ".join(f"{s}={st[s]['docs']}/{st[s]['chars'] / 1e3:.0f}k"
                         for s in ("train", "calib", "eval")))
    for f, info in m["files"].items():
        print(f"  {f}: {info['bytes'] / 1e3:.0f} kB sha256={info['sha256'][:12]}")


if __name__ == "__main__":
    main()
