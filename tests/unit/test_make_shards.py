"""tools/make_shards.py end to end: text, directories and JSONL with the byte, HF and sentencepiece
tokenizers; clear errors for undecodable text and bad JSON (or counted skips); no tokenizer mixing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xft_dist.data import LoaderConfig, Manifest, StreamingLoader
from xft_dist.data.sources import ReadReport, iter_shard
from xft_dist.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Pack my box with five dozen liquor jugs.",
         "Sphinx of black quartz, judge my vow! " * 2, "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich."]


def run(*args):
    if "--workers" not in args:  # one process unless a test is about parallel tokenization
        args = (*args, "--workers", 1)
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def inputs(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(TEXTS[0])
    (d / "sub" / "b.txt").write_text(TEXTS[1])
    (d / "sub" / "empty.txt").write_text("")
    jl = tmp_path / "more.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[2:]) + "\n")
    return d, jl


def _all_docs(out):
    m = Manifest.load(out)
    docs = []
    for s in m.shards:
        docs.extend(d.astype(np.int64) for d in iter_shard(s, vocab_size=m.tokenizer["vocab_size"], skip_bad=False,
                                                           report=ReadReport()))
    return m, docs


def test_byte_shards_from_directories_and_jsonl(inputs, tmp_path):
    d, jl = inputs
    out = tmp_path / "out"
    res = run(d, jl, "--out", out, "--shard-tokens", 60, "--workers", 2)
    assert res.returncode == 0, res.stderr
    assert "skipped 1 empty documents" in res.stdout
    m, docs = _all_docs(out)
    assert m.documents == 4 and len(m.shards) >= 2 and m.tokenizer["kind"] == "byte"
    tok = ByteTokenizer()
    assert [tok.decode(x) for x in docs] == TEXTS  # deterministic order: files sorted, then JSONL lines
    assert m.tokens == sum(len(t.encode()) for t in TEXTS)
    # A loader reads them.
    batch = next(iter(StreamingLoader(out, LoaderConfig(seq_len=16, global_rows=2, num_streams=2))))
    assert batch.input_ids.shape == (2, 16)


def test_hf_and_sentencepiece_tokenizers(inputs, tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d, jl = inputs
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(TEXTS * 20))
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train([str(corpus)], trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    res = run(d, jl, "--out", tmp_path / "hf", "--tokenizer", tmp_path / "tokenizer.json")
    assert res.returncode == 0, res.stderr
    m, docs = _all_docs(tmp_path / "hf")
    assert m.tokenizer["kind"] == "hf" and m.tokenizer["eos_id"] == hf.token_to_id("</s>")
    assert m.tokenizer["pad_id"] == hf.token_to_id("<pad>") and len(docs) == 4
    assert docs[1].tolist() == hf.encode(TEXTS[1], add_special_tokens=False).ids

    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", pad_id=3, minloglevel=2)
    res = run(d, jl, "--out", tmp_path / "sp_out", "--tokenizer", tmp_path / "sp.model", "--workers", 1)
    assert res.returncode == 0, res.stderr
    m, docs = _all_docs(tmp_path / "sp_out")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert m.tokenizer["kind"] == "sentencepiece" and m.tokenizer["vocab_size"] == 60
    assert docs[0].tolist() == sp.encode(TEXTS[0])

    # Mixing tokenizers in one output is refused, whatever the flags.
    for flag in ("--append", "--overwrite"):
        res = run(d, "--out", tmp_path / "hf", "--tokenizer", "byte", flag)
        assert res.returncode == 2 and "refusing to mix" in res.stderr, res.stderr


def test_undecodable_text_and_bad_json_are_named_or_skipped(inputs, tmp_path):
    d, jl = inputs
    (d / "binary.bin").write_bytes(b"ok \xff\xfe not utf-8")
    res = run(d, "--out", tmp_path / "o1")
    assert res.returncode == 2
    assert "binary.bin: not UTF-8 text at byte 3" in res.stderr
    res = run(d, "--out", tmp_path / "o2", "--skip-bad")
    assert res.returncode == 0 and "skipped 1 bad inputs" in res.stdout
    res = run(d, "--out", tmp_path / "o3", "--include", "*.txt")
    assert res.returncode == 0 and "2 documents" in res.stdout
    jl.write_text(jl.read_text() + "{not json\n" + json.dumps({"body": "x"}) + "\n")
    res = run(jl, "--out", tmp_path / "o4")
    assert res.returncode == 2 and "more.jsonl:3: bad JSONL record" in res.stderr
    res = run(jl, "--out", tmp_path / "o5", "--skip-bad")
    assert res.returncode == 0 and "skipped 2 bad inputs" in res.stdout
    # Appending with the same tokenizer extends the manifest; a second plain run is refused.
    res = run(d / "a.txt", "--out", tmp_path / "o5", "--append")
    assert res.returncode == 0 and "3 documents" in res.stdout
    res = run(d / "a.txt", "--out", tmp_path / "o5")
    assert res.returncode == 2 and "--append or --overwrite" in res.stderr
    assert np.all(np.diff([int(s.url.split("-")[-1][:6]) for s in Manifest.load(tmp_path / "o5").shards]) == 1)


def test_valid_fraction_holds_documents_out_deterministically(tmp_path):
    jl = tmp_path / "docs.jsonl"
    texts = [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(200)]
    jl.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    outs = []
    for name, workers in (("a", 1), ("b", 2)):
        res = run(jl, "--out", tmp_path / name, "--valid-fraction", 0.2, "--shard-tokens", 2000, "--workers", workers)
        assert res.returncode == 0, res.stderr
        train, train_docs = _all_docs(tmp_path / name)
        valid, valid_docs = _all_docs(tmp_path / name / "valid")
        assert valid.tokenizer == train.tokenizer
        outs.append(({tuple(d) for d in train_docs}, {tuple(d) for d in valid_docs}))
    (train, valid), (train_b, valid_b) = outs
    assert valid == valid_b and train == train_b  # the split does not depend on the workers
    assert not train & valid and len(train) + len(valid) == 200
    assert 20 <= len(valid) <= 60, len(valid)  # about 20 %
    assert run(jl, "--out", tmp_path / "c", "--valid-fraction", 1.0).returncode == 2


def test_a_validation_set_of_another_tokenizer_is_refused(tmp_path):
    from xft_dist.config import ConfigError
    from xft_dist.config.load import validate
    from xft_dist.data.shards import ShardWriter
    from xft_dist.train.evaluate import valid_manifest

    with ShardWriter(tmp_path / "train", ByteTokenizer().identity(), shard_tokens=100) as w:
        w.write([5, 6, 7])
    other = {**ByteTokenizer().identity(), "kind": "hf", "name": "other.json", "vocab_size": 1000}
    with ShardWriter(tmp_path / "valid", other, shard_tokens=100) as w:
        w.write([5, 6, 7])
    cfg = validate({"data": {"shards": str(tmp_path / "train"), "valid": {"shards": str(tmp_path / "valid")}}})
    with pytest.raises(ConfigError, match=r"data.valid.shards=.*hf:other.json.*byte:byte-v1.*must match"):
        valid_manifest(cfg, Manifest.load(tmp_path / "train"))
    cfg = validate({"data": {"shards": str(tmp_path / "train"), "valid": {"shards": str(tmp_path / "none")}}})
    with pytest.raises(ConfigError, match="data.valid.shards="):
        valid_manifest(cfg, Manifest.load(tmp_path / "train"))


# ------------------------------------------------------------------------- compressed and columnar inputs

def _records(n=40):
    return [{"text": f"document {i}: " + "lorem ipsum " * (1 + i % 7), "id": i} for i in range(n)]


def _jsonl_bytes(records):
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


def test_gzip_zstandard_and_parquet_inputs_give_the_documents_of_plain_jsonl(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    recs = _records()
    (tmp_path / "plain.jsonl").write_bytes(_jsonl_bytes(recs))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(recs)))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(recs)))
    pq.write_table(pa.table({"id": [r["id"] for r in recs], "body": [r["text"] for r in recs]}),
                   tmp_path / "a.parquet", row_group_size=16)
    outs = {}
    for name, extra in (("plain.jsonl", ()), ("a.jsonl.gz", ()), ("a.jsonl.zst", ()),
                        ("a.parquet", ("--parquet-column", "body"))):
        out = tmp_path / f"out-{name}"
        res = run(tmp_path / name, "--out", out, "--shard-tokens", 300, *extra)
        assert res.returncode == 0, (name, res.stderr)
        outs[name] = [ByteTokenizer().decode(d) for d in _all_docs(out)[1]]
    assert outs["plain.jsonl"] == [r["text"] for r in recs]
    assert all(docs == outs["plain.jsonl"] for docs in outs.values())
    res = run(tmp_path / "a.parquet", "--out", tmp_path / "x")  # default column "text" is not there
    assert res.returncode == 2 and "no column 'text'" in res.stderr and "--parquet-column" in res.stderr


def test_inputs_are_streamed_and_counted_in_bytes(tmp_path):
    import gzip

    from xft_dist.data.inputs import documents

    big = tmp_path / "big.jsonl.gz"
    with gzip.open(big, "wb", compresslevel=1) as f:
        for i in range(200):
            f.write(_jsonl_bytes([{"text": np.random.default_rng(i).bytes(15000).hex()}]))  # incompressible: ~6 MB
    seen = []
    docs = documents([big], bad=None, on_bytes=seen.append)
    next(docs)
    assert 0 < sum(seen) < big.stat().st_size / 2  # the first document after one 1 MiB read, not the file
    assert sum(1 for _ in docs) == 199 and sum(seen) == big.stat().st_size


def test_a_damaged_compressed_input_is_named(tmp_path):
    import gzip

    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(_jsonl_bytes(_records()))[:-30])
    res = run(bad, "--out", tmp_path / "out")
    assert res.returncode == 2 and "bad.jsonl.gz: cannot decompress" in res.stderr, res.stderr
