"""Data preparation: handbook mixture arithmetic, token-for-token parity with TRL 1.16's own trainers,
bad-row handling, packing fill vs TRL's global BFD, and the content-addressed cache key.

Parity references are built by constructing the real `SFTTrainer` / `DPOTrainer` on the raw rows and
reading back the dataset they prepared; ours comes from the same actor class Ray Data runs."""

import json

import datasets
import pyarrow as pa
import pytest

from raytrain_align import mixture_order, prepare, sources, tiny, tokenize_blocks
from raytrain_align.errors import RecipeError

from . import prep_data
from .test_sources import rows_in_order

SMOL = "HuggingFaceTB/SmolLM3-3B"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny.materialize(tmp_path_factory.mktemp("tiny") / "assets", SMOL)


@pytest.fixture(scope="module")
def tok_dir(assets):
    return str(tiny.model_dir(assets, SMOL))


@pytest.fixture(scope="module")
def model(tok_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tok_dir)


def _table(rows) -> pa.Table:
    return datasets.Dataset.from_list(rows).with_format("arrow")[:]


def trl_prepared(method, rows, tok_dir, model, tmp_path, training):
    """What TRL's own trainer prepares from `rows` (its train_dataset after __init__)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    if training.get("chat_template"):
        tok.chat_template = training["chat_template"]
    fields = {k: v for k, v in training.items() if k != "chat_template"}
    common = dict(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, use_cpu=True)
    ds = datasets.Dataset.from_list(rows)
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(shuffle_dataset=False, **common, **fields), train_dataset=ds,
                             processing_class=tok)
    elif method == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(**common, **fields), train_dataset=ds,
                             processing_class=tok)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common, **fields), train_dataset=ds, processing_class=tok)
    return trainer.train_dataset


def ours(method, rows, tok_dir, training, options=None):
    actor = tokenize_blocks.TokenizeActor(method, tok_dir, training, options or {})
    return actor(_table(rows)), actor.local_stats.get()


def assert_same(trl_ds, our_table, method):
    assert our_table.num_rows == len(trl_ds) > 0
    for col in tokenize_blocks.OUTPUT_COLUMNS[method]:
        if col in trl_ds.column_names:
            assert our_table.column(col).to_pylist() == trl_ds[col], col
        else:
            assert col not in our_table.column_names


SFT_CASES = {
    "messages, assistant_only_loss, keep_end truncation": (
        prep_data.tricky_messages, {"assistant_only_loss": True, "max_length": 160, "truncation_mode": "keep_end"}),
    "messages, full loss, keep_start truncation": (prep_data.tricky_messages, {"max_length": 200}),
    "messages, assistant masks kept through packing": (
        prep_data.tricky_messages, {"assistant_only_loss": True, "packing": True, "max_length": 256}),
    "prompt/completion conversational, completion_only_loss": (prep_data.prompt_completion, {"max_length": 120}),
    "prompt/completion plain, full loss": (
        lambda: prep_data.prompt_completion(conversational=False), {"completion_only_loss": False, "max_length": 90}),
    "plain text, packed": (prep_data.plain_text, {"packing": True, "max_length": 300}),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_matches_trl(case, tok_dir, model, tmp_path):
    make_rows, fields = SFT_CASES[case]
    training = {"chat_template": prep_data.THINK_TEMPLATE, **fields}
    rows = make_rows()
    table, stats = ours("sft", rows, tok_dir, training)
    assert_same(trl_prepared("sft", rows, tok_dir, model, tmp_path, training), table, "sft")
    assert not stats["drops"]


def test_chat_template_kwargs_and_tools_reach_the_template(tok_dir):
    """The think flag and the tools column change the tokens (so parity above is not vacuous for them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = prep_data.tricky_messages(8)
    table, _ = ours("sft", rows, tok_dir, {"chat_template": prep_data.THINK_TEMPLATE})
    texts = [tok.decode(ids) for ids in table.column("input_ids").to_pylist()]
    assert "/think" in texts[0] and "/no_think" in texts[1]  # rows alternate enable_thinking
    assert "Tools: lookup_tide" in texts[3] and "<call>lookup_tide(" in texts[3]
    assert "Tools:" not in texts[0]


def test_chat_template_kwargs_reach_the_template_in_dpo(tok_dir):
    """The handbook's DPO path ignores the chat_template_kwargs column; TRL 1.16's (which we run) uses it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    table, _ = ours("dpo", prep_data.preferences(4), tok_dir, {"chat_template": prep_data.THINK_TEMPLATE})
    prompts = [tok.decode(ids) for ids in table.column("prompt_ids").to_pylist()]
    assert "/think" in prompts[0] and "/no_think" in prompts[1]


DPO_CASES = {
    "conversational, keep_start drops prompts that fill max_length": (prep_data.preferences, {"max_length": 64}),
    "plain text": (lambda: prep_data.preferences(conversational=False), {"max_length": 80}),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_matches_trl(case, tok_dir, model, tmp_path):
    make_rows, fields = DPO_CASES[case]
    training = {"chat_template": prep_data.THINK_TEMPLATE, **fields}
    rows = make_rows()
    table, _ = ours("dpo", rows, tok_dir, training)
    trl_ds = trl_prepared("dpo", rows, tok_dir, model, tmp_path, training)
    assert len(trl_ds) < len(rows) or case == "plain text"  # the keep_start filter really ran in the first case
    assert_same(trl_ds, table, "dpo")


ORPO_CASES = {
    "conversational, answers truncated to max_length": (prep_data.preferences, {"max_length": 64}),
    "plain text": (lambda: prep_data.preferences(conversational=False), {"max_length": 80}),
    "no prompt column: the shared prefix is the prompt": (prep_data.preferences_without_prompt, {"max_length": 512}),
}


@pytest.mark.parametrize("case", list(ORPO_CASES))
def test_orpo_matches_trl(case, tok_dir, model, tmp_path):
    """ORPOTrainer tokenizes in its __init__ (tokenize_row): the actor runs those same steps on each block. TRL
    keeps a pair whose prompt alone fills max_length with an empty answer (NaN log-odds); those are dropped."""
    make_rows, fields = ORPO_CASES[case]
    training = {"chat_template": prep_data.THINK_TEMPLATE, **fields}
    rows = make_rows()
    table, stats = ours("orpo", rows, tok_dir, training)
    trl_ds = trl_prepared("orpo", rows, tok_dir, model, tmp_path, training)
    empty = [i for i, labels in enumerate(trl_ds["chosen_labels"]) if all(t == -100 for t in labels)]
    assert_same(trl_ds.select([i for i in range(len(trl_ds)) if i not in empty]), table, "orpo")
    assert stats["drops"] == ({"no_loss_tokens_after_truncation": len(empty)} if empty else {})
    lengths = [len(x) for x in table.column("chosen_input_ids").to_pylist()]
    assert max(lengths) <= fields["max_length"]
    if case.startswith("conversational"):  # truncation really happened, and drop mode drops those rows instead
        assert empty and fields["max_length"] in lengths
        dropped, stats = ours("orpo", rows, tok_dir, training, {"long_samples": "drop"})
        assert stats["drops"]["too_long"] == len(rows) - dropped.num_rows > 0
        kept = {tuple(r) for r in table.column("chosen_input_ids").to_pylist()}
        assert {tuple(r) for r in dropped.column("chosen_input_ids").to_pylist()} <= kept


def test_bad_rows_are_dropped_and_counted(tok_dir, model, tmp_path):
    good = prep_data.tricky_messages(12)
    bad = prep_data.bad_rows()
    training = {"chat_template": prep_data.THINK_TEMPLATE, "assistant_only_loss": True, "max_length": 2048}
    mixed = good[:5] + [row for row, _ in bad] + good[5:]
    table, stats = ours("sft", mixed, tok_dir, training)
    want = {}
    for _, reason in bad:
        want[reason] = want.get(reason, 0) + 1
    assert stats["drops"] == want
    assert all(stats["examples"][r] for r in want)
    assert_same(trl_prepared("sft", good, tok_dir, model, tmp_path, training), table, "sft")
    # TRL itself crashes on such rows (what the dropping protects a run from).
    with pytest.raises(Exception):
        trl_prepared("sft", good[:3] + [bad[3][0]], tok_dir, model, tmp_path, training)


def test_template_errors_drop_only_the_failing_row(tok_dir):
    """A row the chat template cannot render (found by retrying the block row by row) is dropped alone."""
    template = prep_data.THINK_TEMPLATE.replace(
        "{%- for message in messages -%}",
        "{%- for message in messages -%}{%- if 'FORBIDDEN' in (message['content'] or '') -%}"
        "{{- raise_exception('no') -}}{%- endif -%}", 1)
    rows = prep_data.tricky_messages(6)
    rows[2]["messages"][0]["content"] = "FORBIDDEN"
    table, stats = ours("sft", rows, tok_dir, {"chat_template": template})
    assert table.num_rows == 5 and stats["drops"] == {"template_error": 1}


def test_long_samples_drop_option(tok_dir):
    rows = prep_data.tricky_messages(12)  # rows 4 and 10 are longer than 160 tokens
    training = {"chat_template": prep_data.THINK_TEMPLATE, "max_length": 160}
    kept, _ = ours("sft", rows, tok_dir, training)
    dropped, stats = ours("sft", rows, tok_dir, training, {"long_samples": "drop"})
    assert kept.num_rows == 12 and max(len(x) for x in kept.column("input_ids").to_pylist()) == 160
    assert stats["drops"]["too_long"] == 12 - dropped.num_rows >= 2


def test_packing_fill_close_to_trl_global_bfd(tok_dir):
    """Per-block BFD (how Ray Data packs) vs TRL's pack_dataset over the whole dataset at once."""
    from trl import pack_dataset

    rows = prep_data.tricky_messages(3000)
    training = {"chat_template": prep_data.THINK_TEMPLATE, "assistant_only_loss": True, "max_length": 512}
    unpacked, _ = ours("sft", rows, tok_dir, {**training, "max_length": 10**6})  # untruncated
    actor = tokenize_blocks.TokenizeActor("sft", tok_dir, {**training, "packing": True}, {})
    table = _table(rows)
    blocks = [actor(table.slice(i, sources.ROWS_PER_BLOCK)) for i in range(0, table.num_rows, sources.ROWS_PER_BLOCK)]
    ours_packed = pa.concat_tables(blocks)
    whole = datasets.Dataset(unpacked.select(["input_ids", "labels"]))
    global_bfd = pack_dataset(whole, 512, "bfd", {"batch_size": len(whole)})

    def fill(n_rows, tokens):
        return tokens / (n_rows * 512)

    ours_tokens = sum(len(x) for x in ours_packed.column("input_ids").to_pylist())
    trl_tokens = sum(len(x) for x in global_bfd["input_ids"])
    assert ours_tokens == trl_tokens  # nothing lost or duplicated
    assert abs(fill(ours_packed.num_rows, ours_tokens) - fill(len(global_bfd), trl_tokens)) <= 0.005
    # Documents are intact inside the packs: split by seq_lengths, they are exactly the unpacked sequences.
    docs = []
    for ids, labels, lengths in zip(*(ours_packed.column(c).to_pylist() for c in ("input_ids", "labels", "seq_lengths"))):
        assert sum(lengths) == len(ids) <= 512
        start = 0
        for n in lengths:
            docs.append((tuple(ids[start:start + n]), tuple(labels[start:start + n])))
            start += n
    expected = [(tuple(i[:512]), tuple(l[:512])) for i, l in zip(unpacked.column("input_ids").to_pylist(),
                                                                 unpacked.column("labels").to_pylist())]
    assert sorted(docs) == sorted(expected)
    assert any(l != -100 for _, ls in docs for l in ls) and any(l == -100 for _, ls in docs for l in ls)


# ------------------------------------------------------------------------------------------------ mixtures


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def three_sets(tmp_path):
    return [_write(tmp_path / f"{name}.jsonl", [{"messages": [{"role": "user", "content": f"{name} {i}"}]} for i in range(100)])
            for name in ("a", "b", "c")]


def _mixture(mix):
    srcs = sources.resolve(mix["datasets"])
    train, test = rows_in_order(srcs, mixture_order.mixture_order(srcs, mix))
    return train, (test if mix.get("test_split_size") is not None else None)


def test_mixture_handbook_arithmetic(three_sets):
    mix = {"datasets": [{"id": p, "split": "train", "weight": w} for p, w in zip(three_sets, (0.5, 0.3, 0.2))],
           "seed": 42, "test_split_size": 0.1}
    train, test = _mixture(mix)
    assert (len(train), len(test)) == (90, 10)
    contents = [r["messages"][0]["content"] for r in train + test]
    assert [sum(c.startswith(n + " ") for c in contents) for n in "abc"] == [50, 30, 20]
    # Each entry's rows are the handbook's: shuffle(seed) then the first int(len x weight).
    a = datasets.load_dataset("json", data_files=three_sets[0], split="train").shuffle(seed=42).select(range(50))
    assert sorted(m[0]["content"] for m in list(a["messages"])) == sorted(c for c in contents if c.startswith("a "))
    mix["test_split_size"] = 7  # an absolute count
    train, test = _mixture(mix)
    assert (len(train), len(test)) == (93, 7)


def test_mixture_upsampling(three_sets):
    mix = {"datasets": [{"id": three_sets[0], "weight": 2.5}, {"id": three_sets[1], "weight": 1.0}], "seed": 3}
    train, test = _mixture(mix)
    assert test is None and len(train) == 350
    counts = {}
    for r in train:
        counts[r["messages"][0]["content"]] = counts.get(r["messages"][0]["content"], 0) + 1
    a_counts = sorted(v for k, v in counts.items() if k.startswith("a "))
    assert len(a_counts) == 100 and a_counts[0] == 2 and a_counts.count(3) == 50
    assert all(v == 1 for k, v in counts.items() if k.startswith("b "))


def test_mixture_bad_inputs(tmp_path, three_sets):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{"messages": [}\n')
    with pytest.raises(RecipeError, match=r"broken.jsonl is malformed at line 2"):
        sources.resolve([{"id": str(broken)}])
    with pytest.raises(RecipeError, match=r"no column\(s\) \['chosen'\].*fix 'columns'"):
        sources.resolve([{"id": three_sets[0], "columns": ["chosen"]}])


def test_cache_key(tmp_path):
    from raytrain_align.plan import build_plan
    from raytrain_align.recipe import load_recipe

    def key(**overrides):
        plan = build_plan(load_recipe("sft_mid", overrides=overrides), tiny=True, storage=str(tmp_path))
        return prepare.cache_key(prepare.cache_spec(plan, ["src-fingerprint"]))

    base = key()
    assert key() == base  # deterministic
    assert key(chat_template="{{ messages }}") != base
    assert key(max_length=256) != base
    assert key(learning_rate=0.5) == base  # optimizer settings do not change the data
    plan = build_plan(load_recipe("sft_mid"), tiny=True, storage=str(tmp_path))
    other = prepare.cache_spec(plan, ["another-source"])
    assert prepare.cache_key(other) != base
