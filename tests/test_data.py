"""Data pipeline: default corpus, JSONL input, tokenizer training, token shards, packed loader (packing, document
boundaries, data-parallel sharding, mid-epoch resume, epoch rollover)."""
import json
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lctrain.data import corpus, shards, tokenizer as tokenizer_module
from lctrain.data.corpus import default_corpus_files, read_documents
from lctrain.data.loader import IGNORE_INDEX, PackedLoader
from lctrain.data.shards import TokenDataset, open_dataset, prepare_data
from lctrain.data.tokenizer import Tokenizer, train_tokenizer

# ----------------------------------------------------------------------------------------------------- corpus


def test_default_corpus_is_stdlib_source_without_tests_and_deterministic():
    files = default_corpus_files()
    root = corpus.stdlib_root()
    assert len(files) > 100
    assert files == default_corpus_files()
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative)
    assert "argparse.py" in relative and "json/decoder.py" in relative
    for path in relative:
        folders = path.split("/")[:-1]
        assert path.endswith(".py")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(folders), path
    documents = list(read_documents(files[:20]))
    assert [d for d in documents] == [f.read_text(encoding="utf-8") for f in files[:20]]


def test_read_documents_text_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nline two\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two \\ud83e\\udd9c", "id": 7}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("# third")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\x00\x01")
    assert list(read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])) == [
        "first document\nline two\n", "one", "two \U0001F99C"]
    assert list(read_documents([tmp_path])) == ["first document\nline two\n", "one", "two \U0001F99C", "# third"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "b.jsonl:2: not a valid JSON line"),
    ('{"body": "x"}', "b.jsonl:2: expected a JSON object with a 'text' field"),
    ('["text"]', "b.jsonl:2: expected a JSON object with a 'text' field"),
    ('{"text": 5}', "b.jsonl:2: field 'text' must be a string, got int"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        list(read_documents([path]))
    assert "\n" not in str(error.value)


def test_bad_inputs_raise_value_error(tmp_path):
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"unsupported type '\.pdf'; allowed: .*\.jsonl"):
        list(read_documents([tmp_path / "x.pdf"]))
    with pytest.raises(ValueError, match="does not exist"):
        list(read_documents([tmp_path / "missing.txt"]))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        list(read_documents([tmp_path / "latin1.txt"]))
    with pytest.raises(ValueError, match="no input files"):
        list(read_documents([]))


# ----------------------------------------------------------------------------------------------------- tokenizer

UNUSUAL_TEXT = "def f(x):\r\n\treturn x  # caf\u00e9 \u6f22\u5b57\n\U0001F99C\x00\x07\x1b[0m \u200b\n\n    1234567890\n"


@pytest.fixture(scope="module")
def sample_files():
    return default_corpus_files()[:80]


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory, sample_files):
    prefix = tmp_path_factory.mktemp("tokenizer") / "tok"
    return Tokenizer(train_tokenizer(sample_files, prefix, vocab_size=600, input_sentence_size=400))


def test_tokenizer_layout_and_round_trip(trained_tokenizer, sample_files):
    tok = trained_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (600, 1, 2, 3)
    assert tok.model_path.with_suffix(".vocab").is_file()
    assert [p.name for p in tok.model_path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert tok.decode(tok.encode(UNUSUAL_TEXT)) == UNUSUAL_TEXT
    # Characters absent from the training text become their UTF-8 bytes: byte b is id 4 + b.
    for rare in ("\U0001F99C", "\x07", "\x00"):
        assert tok.encode(rare) == [4 + b for b in rare.encode("utf-8")]
    source = max(sample_files, key=lambda f: f.stat().st_size).read_text()
    ids = tok.encode(source)
    assert tok.decode(ids) == source
    assert len(ids) < len(source) / 2  # merges learned: code compresses
    assert tok.encode_batch([source, UNUSUAL_TEXT], num_threads=2) == [ids, tok.encode(UNUSUAL_TEXT)]
    assert [tok.decode([i]) for i in tok.encode("1234567890")] == list("1234567890")  # digits split
    assert pickle.loads(pickle.dumps(tok)).encode(source) == ids


def test_tokenizer_training_is_deterministic_and_unigram_works(tmp_path, trained_tokenizer, sample_files):
    again = train_tokenizer(sample_files, tmp_path / "again", vocab_size=600, input_sentence_size=400)
    assert again.read_bytes() == trained_tokenizer.model_path.read_bytes()
    unigram = Tokenizer(train_tokenizer(sample_files[:30], tmp_path / "uni", vocab_size=500, model_type="unigram",
                                        input_sentence_size=200))
    assert unigram.vocab_size == 500 and unigram.decode(unigram.encode(UNUSUAL_TEXT)) == UNUSUAL_TEXT


def test_tokenizer_errors(tmp_path, sample_files):
    with pytest.raises(ValueError, match="model_type 'wordpiece' is not supported; allowed: bpe, unigram"):
        train_tokenizer(sample_files, tmp_path / "t", 600, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size 100 is too small; it must exceed 260"):
        train_tokenizer(sample_files, tmp_path / "t", 100)
    with pytest.raises(ValueError, match="input_sentence_size 50 is too small; allowed: > 100"):
        train_tokenizer(sample_files, tmp_path / "t", 600, input_sentence_size=50)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: field 'text' must be a string"):
        train_tokenizer([bad], tmp_path / "t", 600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer(tmp_path / "nothing.model")


def test_tokenizer_write_is_atomic(tmp_path, sample_files, monkeypatch):
    prefix = tmp_path / "tok"
    model = train_tokenizer(sample_files[:10], prefix, 400)
    before = model.read_bytes()
    real_replace = os.replace

    def crash_on_model(source, target):
        if str(target).endswith(".model"):
            raise OSError("disk full")
        real_replace(source, target)

    monkeypatch.setattr(tokenizer_module.os, "replace", crash_on_model)
    with pytest.raises(OSError, match="disk full"):
        train_tokenizer(sample_files[:20], prefix, 500)
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.model", "tok.vocab"]


# ----------------------------------------------------------------------------------------------------- shards


@pytest.fixture()
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = [f"document {i}: " + "word " * (i * 7 % 50) + "\U0001F99C" * (i % 3) for i in range(40)]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:30]))
    for i, text in enumerate(texts[30:]):
        (folder / f"f{i}.txt").write_text(text)
    (folder / "empty.txt").write_text("")
    return folder, texts  # folder order: docs.jsonl, empty.txt, f0.txt ... (sorted), the empty one is skipped


def test_prepare_data_writes_shards_and_meta(tmp_path, corpus_dir, trained_tokenizer):
    folder, texts = corpus_dir
    tok = trained_tokenizer
    out = tmp_path / "tokens"
    meta = prepare_data([folder], tok, out, eval_fraction=0.1, shard_tokens=200)
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["sha256"] == tok.sha256()
    assert meta["tokenizer"]["vocab_size"] == 600 and meta["tokenizer"]["eos_id"] == 2
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    assert meta["splits"]["eval"]["num_documents"] == 4  # ceil(40 x 0.1), evenly spaced: documents 5, 15, 25, 35
    assert len(meta["splits"]["train"]["shards"]) > 2
    eval_index = {5, 15, 25, 35}
    for split, expected in (("train", [t for i, t in enumerate(texts) if i not in eval_index]),
                            ("eval", [texts[i] for i in sorted(eval_index)])):
        data = open_dataset(out, split)
        assert data.num_documents == len(expected) == meta["splits"][split]["num_documents"]
        assert isinstance(data.shards[0], np.memmap)
        stream = []
        for i, text in enumerate(expected):
            document = data.document(i)
            assert document[-1] == tok.eos_id and tok.decode(document[:-1]) == text
            stream.extend(tok.encode(text) + [tok.eos_id])
        assert data.tokens(0, data.num_tokens).tolist() == stream
        assert data.document_starts[-1] == data.num_tokens == meta["splits"][split]["num_tokens"]
    # Documents never span shards; a shard closes once it reaches shard_tokens.
    for shard in meta["splits"]["train"]["shards"]:
        offsets = np.load(out / shard["documents"])
        assert offsets[0] == 0 and offsets[-1] == shard["num_tokens"]
        assert offsets[-2] < 200
    # The thread count does not change the result.
    prepare_data([folder], tok, tmp_path / "threads", eval_fraction=0.1, shard_tokens=200, num_workers=2)
    for name in sorted(os.listdir(out)):
        if name.endswith(".bin"):
            assert (out / name).read_bytes() == (tmp_path / "threads" / name).read_bytes()


def test_prepare_data_default_corpus(tmp_path, trained_tokenizer):
    meta = prepare_data(None, trained_tokenizer, tmp_path / "default", eval_documents=3, num_workers=2)
    assert meta["inputs"][0].startswith("default corpus: Python ")
    assert meta["splits"]["eval"]["num_documents"] == 3
    total = sum(1 for text in read_documents(default_corpus_files()) if text)
    assert meta["splits"]["train"]["num_documents"] == total - 3
    data = open_dataset(tmp_path / "default", "train")
    assert data.num_tokens > 1_000_000
    data.check_tokenizer(trained_tokenizer)


def test_prepare_data_refuses_to_overwrite_and_errors(tmp_path, corpus_dir, trained_tokenizer, sample_files):
    folder, _ = corpus_dir
    out = tmp_path / "tokens"
    out.mkdir()  # an empty folder may be filled
    prepare_data([folder], trained_tokenizer, out)
    first = (out / "train-00000.bin").read_bytes()
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True") as error:
        prepare_data([folder], trained_tokenizer, out)
    assert "\n" not in str(error.value)
    prepare_data([folder / "docs.jsonl"], trained_tokenizer, out, overwrite=True)
    assert (out / "train-00000.bin").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tokens"]
    with pytest.raises(ValueError, match="eval split would take 40 of them and leave none"):
        prepare_data([folder], trained_tokenizer, tmp_path / "x", eval_documents=40)
    with pytest.raises(ValueError, match="eval_fraction 1.5 must be in"):
        prepare_data([folder], trained_tokenizer, tmp_path / "x", eval_fraction=1.5)
    (folder / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a valid JSON line"):
        prepare_data([folder], trained_tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="split 'dev' is not known; allowed: train, eval"):
        open_dataset(out, "dev")
    with pytest.raises(ValueError, match="not a prepared data folder"):
        open_dataset(tmp_path, "train")
    other = Tokenizer(train_tokenizer(sample_files[:10], tmp_path / "other", 400))
    with pytest.raises(ValueError, match="is not the one the data was prepared with"):
        open_dataset(out, "train").check_tokenizer(other)


def test_prepare_data_crash_leaves_nothing_half_written(tmp_path, corpus_dir, trained_tokenizer, monkeypatch):
    folder, _ = corpus_dir
    real_save = np.save
    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("simulated crash while writing a shard")
        real_save(*args, **kwargs)

    monkeypatch.setattr(shards.np, "save", crash_on_second_shard)
    with pytest.raises(OSError, match="simulated crash"):
        prepare_data([folder], trained_tokenizer, tmp_path / "fresh", shard_tokens=200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # neither out_dir nor a staging folder

    monkeypatch.setattr(shards.np, "save", real_save)
    prepare_data([folder], trained_tokenizer, tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()}
    calls.clear()
    monkeypatch.setattr(shards.np, "save", crash_on_second_shard)
    with pytest.raises(OSError, match="simulated crash"):
        prepare_data([folder / "docs.jsonl"], trained_tokenizer, tmp_path / "kept", shard_tokens=200, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "kept"]


# ----------------------------------------------------------------------------------------------------- loader


def make_dataset(lengths, shard_cuts=()):
    """Documents of the given lengths with unique tokens (token = storage position + 10), split into shards after the
    documents listed in shard_cuts."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(starts[-1], dtype=np.uint32) + 10
    cuts = [0] + sorted(set(shard_cuts)) + [len(lengths)]
    cuts = sorted(set(cuts))
    shard_arrays, offsets = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        shard_arrays.append(tokens[starts[a]:starts[b]])
        offsets.append(starts[a:b + 1] - starts[a])
    return TokenDataset(shard_arrays, offsets)


def reference_epoch(dataset, order, seq_len, micro_batch_size, dp_size):
    """Per rank, the epoch's batches built token by token from the definition."""
    stream, ends_document = [], []
    for d in order:
        document = dataset.document(int(d)).tolist()
        stream += document
        ends_document += [False] * (len(document) - 1) + [True]
    sequences = (len(stream) - 1) // seq_len
    batches = sequences // (micro_batch_size * dp_size)
    per_rank = [[] for _ in range(dp_size)]
    for k in range(batches):
        rows = {r: [] for r in range(dp_size)}
        for i in range(k * micro_batch_size * dp_size, (k + 1) * micro_batch_size * dp_size):
            rows[i % dp_size].append(i)
        for rank, indices in rows.items():
            inputs, labels, cu = [], [], []
            for b, i in enumerate(indices):
                start = i * seq_len
                inputs.append(stream[start:start + seq_len])
                labels.append([IGNORE_INDEX if ends_document[start + t] else stream[start + t + 1]
                               for t in range(seq_len)])
                cu += [b * seq_len + t for t in range(seq_len) if t == 0 or ends_document[start + t - 1]]
            per_rank[rank].append((inputs, labels, cu + [len(indices) * seq_len]))
    return per_rank, stream


def epoch_order(seed, epoch, count, shuffle):
    return np.random.default_rng([seed, epoch]).permutation(count) if shuffle else np.arange(count)


loader_cases = st.fixed_dictionaries({
    "lengths": st.lists(st.integers(1, 30), min_size=1, max_size=25),
    "seq_len": st.integers(1, 24),
    "micro_batch_size": st.integers(1, 3),
    "dp_size": st.integers(1, 3),
    "seed": st.integers(0, 2**31),
    "shuffle": st.booleans(),
    "cuts": st.lists(st.integers(1, 24), max_size=3),
})


def build_loaders(case):
    dataset = make_dataset(case["lengths"], [c for c in case["cuts"] if c < len(case["lengths"])])
    try:
        return dataset, [PackedLoader(dataset, case["seq_len"], case["micro_batch_size"], rank, case["dp_size"],
                                      case["seed"], case["shuffle"]) for rank in range(case["dp_size"])]
    except ValueError as error:
        assert "one global batch needs" in str(error)
        return dataset, None


@settings(max_examples=150, deadline=None)
@given(loader_cases)
def test_loader_matches_reference_and_shards_disjointly(case):
    dataset, loaders = build_loaders(case)
    if loaders is None:
        return
    T, B, P = case["seq_len"], case["micro_batch_size"], case["micro_batch_size"] * case["dp_size"]
    for epoch in range(2):
        order = epoch_order(case["seed"], epoch, dataset.num_documents, case["shuffle"])
        expected, stream = reference_epoch(dataset, order, T, B, case["dp_size"])
        seen = []
        for rank, loader in enumerate(loaders):
            assert loader.batches_per_epoch == len(expected[rank]) > 0
            for inputs, labels, cu in expected[rank]:
                batch = next(loader)
                assert loader.epoch == epoch
                assert batch.input_ids.dtype == batch.labels.dtype == batch.cu_seqlens.dtype == torch.int64
                assert batch.input_ids.tolist() == inputs
                assert batch.labels.tolist() == labels
                assert batch.cu_seqlens.tolist() == cu
                assert batch.num_tokens() == sum(label != IGNORE_INDEX for row in labels for label in row)
                seen += batch.input_ids.flatten().tolist()
        # Tokens are unique: the ranks' inputs are disjoint and together are the stream's first batches x P x T.
        used = loaders[0].batches_per_epoch * P * T
        assert len(seen) == len(set(seen)) == used
        assert set(seen) == set(stream[:used])
    # The permutation orders whole documents; without shuffling the stream is the storage order.
    if not case["shuffle"]:
        assert stream == dataset.tokens(0, dataset.num_tokens).tolist()


@settings(max_examples=100, deadline=None)
@given(loader_cases, st.integers(0, 12))
def test_loader_resume_mid_epoch_gives_identical_batches(case, taken):
    dataset, loaders = build_loaders(case)
    if loaders is None:
        return
    first, last = loaders[0], loaders[-1]  # the same loader when dp_size = 1
    for loader in {id(first): first, id(last): last}.values():
        for _ in range(taken):
            next(loader)
    state = last.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain JSON-able values
    assert first.state_dict() == state  # the state is the same on every rank
    # A state saved on one rank restores every rank.
    restored = [PackedLoader(dataset, case["seq_len"], case["micro_batch_size"], rank, case["dp_size"],
                             case["seed"], case["shuffle"]) for rank in (0, case["dp_size"] - 1)]
    for loader in restored:
        loader.load_state_dict(state)
    for _ in range(2 * first.batches_per_epoch + 1):  # crosses at least one epoch boundary
        batches = {id(first): next(first), id(last): next(last)} if first is not last else {id(first): next(first)}
        for original, resumed in ((first, restored[0]), (last, restored[1])):
            a, b = batches[id(original)], next(resumed)
            assert (original.epoch, original.position) == (resumed.epoch, resumed.position)
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.cu_seqlens, b.cu_seqlens)


def test_loader_resume_under_another_data_parallel_layout():
    dataset = make_dataset([7, 3, 12, 1, 9, 30, 4, 4, 15, 2] * 4)
    two_ranks = [PackedLoader(dataset, 8, 2, rank, 2, seed=3) for rank in range(2)]
    for loader in two_ranks:
        next(loader)
    four_ranks = [PackedLoader(dataset, 8, 1, rank, 4, seed=3) for rank in range(4)]
    for loader in four_ranks:
        loader.load_state_dict(two_ranks[0].state_dict())
    # The next global batch holds the same four sequences: rank r of four gets sequence r, rank r of two gets r, r+2.
    rows_two = [next(loader).input_ids for loader in two_ranks]
    rows_four = [next(loader).input_ids[0] for loader in four_ranks]
    for r in range(4):
        assert torch.equal(rows_four[r], rows_two[r % 2][r // 2])


def test_loader_epochs_roll_over():
    dataset = make_dataset([5, 9, 2, 14, 7, 3, 11, 6])
    loader = PackedLoader(dataset, 4, 2, seed=1)
    plain = PackedLoader(dataset, 4, 2, shuffle=False)
    assert loader.batches_per_epoch == plain.batches_per_epoch == (57 - 1) // 4 // 2
    epochs = []
    for _ in range(3):
        epochs.append(torch.cat([next(loader).input_ids.flatten() for _ in range(7)]).tolist())
        assert loader.epoch == len(epochs) - 1
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation each epoch
    plain_epochs = [[next(plain).input_ids for _ in range(7)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*plain_epochs)) and plain.epoch == 1


def test_loader_errors():
    dataset = make_dataset([3, 4])
    with pytest.raises(ValueError, match="6 sequences of seq_len 1; one global batch needs dp_size x micro_batch_size = 8"):
        PackedLoader(dataset, 1, 4, 0, 2)
    with pytest.raises(ValueError, match=r"dp_rank 2 must be in \[0, dp_size = 2\)"):
        PackedLoader(dataset, 1, 1, 2, 2)
    loader = PackedLoader(dataset, 2, 1)
    with pytest.raises(ValueError, match="loader state has seq_len=3 but this loader has 2"):
        loader.load_state_dict({**loader.state_dict(), "seq_len": 3})


def test_loader_over_prepared_memmap_shards(tmp_path, corpus_dir, trained_tokenizer):
    folder, _ = corpus_dir
    prepare_data([folder], trained_tokenizer, tmp_path / "tokens", eval_fraction=0, shard_tokens=150)
    on_disk = open_dataset(tmp_path / "tokens", "train")
    assert len(on_disk.shards) > 3
    in_memory = TokenDataset([np.array(s) for s in on_disk.shards],
                             [np.load(tmp_path / "tokens" / s["documents"])
                              for s in on_disk.meta["splits"]["train"]["shards"]])
    loaders = [PackedLoader(d, 64, 2, 1, 2, seed=5) for d in (on_disk, in_memory)]
    order = epoch_order(5, 0, on_disk.num_documents, True)
    expected, _ = reference_epoch(in_memory, order, 64, 2, 2)
    for inputs, labels, cu in expected[1]:
        a, b = (next(loader) for loader in loaders)
        assert a.input_ids.tolist() == b.input_ids.tolist() == inputs
        assert a.labels.tolist() == labels and a.cu_seqlens.tolist() == cu
        # Every document start is a segment start and its previous token is masked; EOS ends each document.
        eos_positions = (a.input_ids.flatten() == trained_tokenizer.eos_id).nonzero().flatten()
        assert (a.labels.flatten()[eos_positions] == IGNORE_INDEX).all()
