"""CaseOps: the transform is lossless (property tests), the sidecar counts original bytes exactly."""

from __future__ import annotations

import json
import random
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.data import caseops as co
from pgolf.data.bpb import load_sentencepiece, load_sidecar
from pgolf.data.build import CASEOPS_TRAINER_ARGS, TRAINER_ARGS, train_tokenizer
from pgolf.data.loader import load_val_tokens
from pgolf.errors import DataError

T, A, C, E = co.TITLE, co.ALLCAPS, co.CAPNEXT, co.ESC

# text that exercises every rule: ASCII words of every case, the operators themselves, SentencePiece's
# space mark, non-ASCII letters next to ASCII ones, whitespace runs, control characters, emoji
ALPHABET = st.sampled_from(list("aAbBzZ") + [T, A, C, E, co.SPACE_MARK, "é", "É", "ß", " ", "  ", "\n", "\t",
                                             "\x00", "'", "1", "😀", "ﬁ", "\u00a0"])
TEXT = st.lists(ALPHABET, max_size=40).map("".join) | st.text(max_size=60)


@pytest.mark.parametrize("text, encoded", [
    ("The NASA Launch", f"{T}the {A}nasa {T}launch"),
    ("iPhone OpenAI", f"i{C}phone {T}open{C}a{C}i"),
    ("McDonald's", f"{T}mc{C}donald's"),
    ("A I x", f"{T}a {T}i x"),  # one capital is Titlecase, not ALLCAPS (>= 2 letters)
    ("ABc aBC", f"{T}a{C}bc a{C}b{C}c"),
    ("ÉTÉ Été", f"É{T}tÉ Été"),  # only ASCII letters: É splits the run
    (f"x{T}y{E}{E}", f"x{E}{T}y{E}{E}{E}{E}"),  # literal operators are escaped
    ("", ""),
])
def test_encode_follows_the_spec(text, encoded):
    assert co.encode(text) == encoded
    assert co.decode(encoded) == text


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_round_trip_is_lossless(text):
    encoded = co.encode(text)
    assert co.decode(encoded) == text
    assert not any("A" <= ch <= "Z" for ch in encoded)  # every ASCII capital became an operator
    assert co.encode(co.decode(encoded)) == encoded


def test_round_trip_on_a_seeded_random_corpus():
    rng = random.Random(1234)
    pool = string.ascii_letters + string.digits + " \n\t.,'" + "".join(co.OPERATORS) + "éÉ😀▁"
    for _ in range(2_000):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 80)))
        assert co.decode(co.encode(text)) == text


@pytest.mark.parametrize("bad", [T, f"a{T}b", f"{A}a", f"{A}ab{C}c", f"{C}ab", f"ab{C}", E, f"{E}x", f"{T}{T}a",
                                 f"{T}a{C}b"])  # the last decodes to "AB", which encodes as ALLCAPS
def test_decode_refuses_what_encode_never_writes(bad):
    with pytest.raises(co.CaseOpsError):
        co.decode(bad)


# ---------------------------------------------------------------------------------------------
# the sidecar


@pytest.fixture(scope="module")
def caseops_sp(offline_caseops_data):
    return load_sentencepiece(offline_caseops_data / "tokenizer.model")


@pytest.fixture(scope="module")
def table(caseops_sp):
    return co.ByteTable.from_sentencepiece(caseops_sp)


def sidecar_of(text, sp, table):
    return co.doc_sidecar(text, sp.encode(co.encode(text)), table)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_sidecar_sums_to_the_original_utf8_length(caseops_sp, table, text):
    ids = caseops_sp.encode(co.encode(text))
    counts = co.doc_sidecar(text, ids, table)
    assert counts.dtype == np.uint16 and counts.size == len(ids)
    assert int(counts.sum()) == len(text.encode("utf-8"))
    ops = set(table.operator_ids.tolist())
    for pos, (tok, n) in enumerate(zip(ids, counts.tolist())):
        if tok in ops and not (pos and ids[pos - 1] == table.esc_id and n == 3):
            assert n == 0  # an operator costs nothing, unless it is an escaped literal


def test_sidecar_by_hand(caseops_sp, table):
    text = f"The NASA{T} a\u2581b"
    ids = caseops_sp.encode(co.encode(text))
    pieces = [caseops_sp.id_to_piece(i) for i in ids]
    counts = co.doc_sidecar(text, ids, table).tolist()
    assert pieces[:2] == [T, "the"] and counts[:2] == [0, 3]  # TITLE costs nothing; "the" is "The"
    assert counts[pieces.index(A)] == 0 and counts[pieces.index(E)] == 0
    assert pieces[pieces.index(E) + 1] == T and counts[pieces.index(E) + 1] == 3  # the escaped literal
    assert pieces[-2:] == ["▁a", "▁b"] and counts[-2:] == [2, 4]  # a literal "▁" is 3 bytes, not a space
    assert sum(counts) == len(text.encode()) == 17


def test_offline_caseops_sidecar_matches_the_documents(offline_caseops_data, caseops_sp, table):
    """The built sidecar is [0] + doc_sidecar(doc) per val document, and sums to the docs' UTF-8 bytes."""
    manifest = json.loads((offline_caseops_data / "manifest.json").read_text())
    n_val = manifest["docs"]["val"]
    assert manifest["text_transform"] == co.TEXT_TRANSFORM
    with open(offline_caseops_data / "docs.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for _, line in zip(range(n_val), fh)]
    sidecar = load_sidecar(offline_caseops_data)
    tokens = load_val_tokens(offline_caseops_data)
    expected = np.concatenate([np.concatenate([[0], sidecar_of(d, caseops_sp, table)]) for d in docs])
    np.testing.assert_array_equal(sidecar, expected)
    assert int(sidecar.sum()) == sum(len(d.encode("utf-8")) for d in docs)
    assert np.all(sidecar[tokens == 1] == 0)  # BOS
    # the transformed text is longer: scoring it would divide by bytes that are not in the data
    transformed = sum(len(co.encode(d).encode("utf-8")) for d in docs)
    assert transformed > int(sidecar.sum()) + 3 * 1000


def test_a_normalizing_tokenizer_cannot_make_a_sidecar(offline_data, tmp_path):
    """NFKC folds "ﬁ" to "fi" and collapses spaces: its tokens do not spell the original text."""
    with open(offline_data / "docs.jsonl", encoding="utf-8") as fh:
        docs = [co.encode(json.loads(line)["text"]) for _, line in zip(range(300), fh)]
    path = train_tokenizer(docs, tmp_path / "nfkc.model", 512,
                           trainer_args={**TRAINER_ARGS, "user_defined_symbols": list(co.OPERATORS)})
    sp = load_sentencepiece(path)
    nfkc = co.ByteTable.from_sentencepiece(sp)
    assert int(co.doc_sidecar("plain text", sp.encode("plain text"), nfkc).sum()) == 10
    with pytest.raises(DataError, match="document 0: .* not lossless"):
        sidecar_of("The ﬁrst  time", sp, nfkc)
    assert CASEOPS_TRAINER_ARGS["normalization_rule_name"] == "identity"


def test_plain_tokenizers_are_not_caseops(offline_data):
    sp = load_sentencepiece(offline_data / "tokenizer.model")
    assert co.operator_ids(sp) is None
    with pytest.raises(DataError, match="does not reserve the CaseOps operators"):
        co.ByteTable.from_sentencepiece(sp, "plain.model")


# ---------------------------------------------------------------------------------------------
# end to end: a debug run on CaseOps text scores original bytes through the sidecar


@pytest.fixture(scope="module")
def caseops_run(offline_caseops_data, tmp_path_factory):
    """`pgolf run --preset debug` on a cut of data/offline-caseops: 40K train tokens, the first whole
    val documents up to ~6K tokens (sidecar cut at the same place)."""
    from pgolf.cli import main
    from pgolf.data.shards import read_shard, write_shard

    small = tmp_path_factory.mktemp("caseops_small")
    val = np.asarray(read_shard(offline_caseops_data / "fineweb_val_000000.bin"))
    sidecar = np.asarray(read_shard(offline_caseops_data / "fineweb_val_bytes_000000.bin"))
    bos = np.flatnonzero(val == 1)
    cut = int(bos[np.searchsorted(bos, 6_000)])  # whole documents only
    write_shard(small / "fineweb_val_000000.bin", val[:cut])
    write_shard(small / "fineweb_val_bytes_000000.bin", sidecar[:cut])
    write_shard(small / "fineweb_train_000000.bin",
                np.asarray(read_shard(offline_caseops_data / "fineweb_train_000000.bin"))[:40_000])
    (small / "tokenizer.model").write_bytes((offline_caseops_data / "tokenizer.model").read_bytes())
    run_dir = tmp_path_factory.mktemp("runs") / "caseops-e2e"
    code = main(["run", "--preset", "debug", "--out", str(run_dir), "--data", str(small),
                 "--tokenizer-path", str(small / "tokenizer.model"), "--run-id", "caseops-e2e",
                 "--iterations", "6", "--sync-every-seconds", "0"])
    return run_dir, small, int(np.count_nonzero(val[:cut] == 1)), code


def test_a_debug_run_scores_original_bytes_through_the_sidecar(caseops_run, offline_caseops_data, table):
    run_dir, small, n_docs, code = caseops_run
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    audit = np.load(run_dir / "eval_per_token.npz")
    sidecar = load_sidecar(small)
    tokens = load_val_tokens(small)
    assert audit["bytes"].size == summary["targets"] == tokens.size - 1
    np.testing.assert_array_equal(audit["bytes"], sidecar[1:])  # every target's bytes come from the sidecar
    with open(offline_caseops_data / "docs.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for _, line in zip(range(n_docs), fh)]
    original = sum(len(d.encode("utf-8")) for d in docs)
    assert summary["bytes"] == int(audit["bytes"].sum()) == original  # the original text, byte for byte
    nll = audit["nll"].astype(np.float64).sum()
    assert summary["val_bpb"] == pytest.approx(nll / (np.log(2) * original), rel=1e-6)
    transformed = int(table.transformed_bytes(tokens[1:]).sum())  # what a byte table on the stream would count
    assert transformed == sum(len(co.encode(d).encode("utf-8")) for d in docs) > original
    assert nll / (np.log(2) * transformed) < summary["val_bpb"] * 0.99  # that would flatter the score


def test_the_caseops_run_carries_the_leakage_check(caseops_run):
    run_dir, *_ = caseops_run
    rule = json.loads((run_dir / "compliance.json").read_text())["val_not_trained_on"]
    assert rule["ok"] is True and rule["value"] == 0
    assert "doc-hash" in rule["how"] and "0 val shards" in rule["how"]
    leak = json.loads((run_dir / "summary.json").read_text())["leakage_check"]
    assert leak["source"] == "computed at run time" and leak["checked_docs"] > 0


def test_a_caseops_tokenizer_without_a_sidecar_is_refused(caseops_run, tmp_path):
    from pgolf.data.bpb import val_target_bytes

    _, small, _, _ = caseops_run
    for p in small.glob("fineweb_*.bin"):
        if "_bytes_" not in p.name:
            (tmp_path / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="CaseOps tokenizer but the folder has no fineweb_val_bytes"):
        val_target_bytes(tmp_path, load_val_tokens(tmp_path), small / "tokenizer.model")
