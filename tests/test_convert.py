"""End to end on tiny Mixtrals: the output loads in transformers and equals a reference merge."""

import json

import pytest
import torch
from checkpoints import EXPERT, ROUTER, load_all, logits_of, save_tiny_mixtral, tree_digest
from safetensors.torch import save_file

from hcconvert.model import decoder
from hcconvert.model.decoder import compute_dtype, half_is_fast
from hcconvert.pipeline.convert import convert
from hcconvert.pipeline.options import ConvertOptions


def reference_merge(src, out, router_method):
    """Rebuild the reduced tensors in the test from hcconvert.json's groups and frequencies."""
    record = json.loads((out / "hcconvert.json").read_text())
    tensors = load_all(src)
    for entry in record["layers"]:
        layer, groups = entry["layer"], entry["groups"]
        freq = torch.tensor(entry["frequencies"], dtype=torch.float64)
        originals = {k: tensors.pop(k) for k in list(tensors)
                     if k.startswith(f"model.layers.{layer}.block_sparse_moe.")}
        rows = []
        for c, group in enumerate(groups):
            f = freq[group] if freq[group].sum() > 0 else torch.ones(len(group))
            weights = (f / f.sum()).float()
            for w in ("w1", "w2", "w3"):
                members = [originals[EXPERT.format(layer=layer, e=e, w=w)] for e in group]
                # fp32, members added in group order: a bf16 result is then bit-exact
                merged = sum(m.float() * weight for m, weight in zip(members, weights,
                                                                    strict=True))
                tensors[EXPERT.format(layer=layer, e=c, w=w)] = merged.to(members[0].dtype)
            router = originals[ROUTER.format(layer=layer)]
            if router_method == "dominant":
                rows.append(router[max(group, key=lambda e: (freq[e], -e))])
            else:
                rows.append((router[group].float() * weights[:, None]).sum(0).to(router.dtype))
        tensors[ROUTER.format(layer=layer)] = torch.stack(rows)
    return tensors


@pytest.mark.parametrize("dtype,hub_style", [
    (torch.float32, False),  # transformers 5 config: rope_parameters, dtype
    (torch.float32, True),  # the Hub's original config: rope_theta, torch_dtype
    (torch.bfloat16, True),  # bf16 weights: merge in fp32, cast back
])
@pytest.mark.parametrize("router", ["freq-avg", "dominant"])
def test_output_loads_and_equals_reference_merge(tmp_path, calib_text, dtype, hub_style, router):
    src = save_tiny_mixtral(tmp_path / "src", dtype=dtype, hub_style_config=hub_style)
    out = tmp_path / "out"
    options = ConvertOptions(method="hc-smoe",
                             experts=4, calib=str(calib_text), calib_samples=4, seq_len=64,
                             router=router)
    convert(str(src), out, options, progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4
    assert {k: v for k, v in config.items() if k != "num_local_experts"} == \
        {k: v for k, v in json.loads((src / "config.json").read_text()).items()
         if k != "num_local_experts"}
    written = load_all(out)
    expected = reference_merge(src, out, router)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype, name
        torch.testing.assert_close(written[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    save_file(expected, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    (ref_dir / "config.json").write_text((out / "config.json").read_text())
    tokens = torch.randint(3, 200, (2, 24))
    torch.testing.assert_close(logits_of(out, tokens), logits_of(ref_dir, tokens))


def test_output_layout_and_files(tmp_path, calib_text):
    src = save_tiny_mixtral(tmp_path / "src")
    out = tmp_path / "out"
    options = ConvertOptions(method="hc-smoe",
                             experts=3, calib=str(calib_text), calib_samples=2, seq_len=32,
                             max_shard_size=30_000)
    convert(str(src), out, options, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    written = load_all(out)
    assert set(written) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in written.values())
    for layer in range(2):
        experts = {k for k in written if f"layers.{layer}.block_sparse_moe.experts." in k}
        assert experts == {EXPERT.format(layer=layer, e=e, w=w) for e in range(3)
                           for w in ("w1", "w2", "w3")}
        assert written[ROUTER.format(layer=layer)].shape == (3, 32)
    assert all(torch.isfinite(t.float()).all() for t in written.values())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "hcconvert.json", "README.md"):
        assert (out / name).is_file(), name
    record = json.loads((out / "hcconvert.json").read_text())
    assert [len(sum(entry["groups"], [])) for entry in record["layers"]] == [6, 6]
    assert "base_model" not in (out / "README.md").read_text()  # a local source has no Hub id
    assert not list(tmp_path.glob(".out*")), "staging directory left behind"


def test_top_k_drops_with_a_warning(tmp_path, calib_text, capsys):
    src = save_tiny_mixtral(tmp_path / "src")
    options = ConvertOptions(method="hc-smoe",
                             experts=1, calib=str(calib_text), calib_samples=2, seq_len=32)
    convert(str(src), tmp_path / "out", options, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (1, 1)
    assert "top-k drops from 2 to 1" in capsys.readouterr().err


def test_top_k_drops_in_every_key_that_holds_it():
    """GPT-OSS's Hub config repeats the top-k as experts_per_token (read by TensorRT-LLM and
    OpenAI's code): it drops with num_experts_per_tok; a key the config lacks stays absent."""
    from hcconvert.model.families import family_for
    from hcconvert.pipeline.metadata import reduced_config

    config = {"model_type": "gpt_oss", "num_local_experts": 32, "num_experts_per_tok": 4,
              "experts_per_token": 4}
    reduced = reduced_config(config, family_for(config), experts=2, top_k=2)
    assert (reduced["num_local_experts"], reduced["num_experts_per_tok"],
            reduced["experts_per_token"]) == (2, 2, 2)
    del config["experts_per_token"]
    assert "experts_per_token" not in reduced_config(config, family_for(config), 2, 2)


@pytest.mark.parametrize("propagate", ["original", "merged"])
def test_source_bytes_unchanged(tmp_path, calib_text, propagate):
    src = save_tiny_mixtral(tmp_path / "src")
    before = tree_digest(src)
    options = ConvertOptions(method="hc-smoe",
                             experts=2, calib=str(calib_text), calib_samples=2, seq_len=32,
                             propagate=propagate, router="lse-fit")
    convert(str(src), tmp_path / "out", options, progress=False)
    assert tree_digest(src) == before


def test_propagate_changes_only_later_layers(tmp_path, calib_text):
    src = save_tiny_mixtral(tmp_path / "src")
    records = {}
    for propagate in ("original", "merged"):
        out = tmp_path / propagate
        options = ConvertOptions(method="hc-smoe",
                                 experts=3, calib=str(calib_text), calib_samples=2, seq_len=32,
                                 propagate=propagate)
        convert(str(src), out, options, progress=False)
        records[propagate] = json.loads((out / "hcconvert.json").read_text())["layers"]
    # Layer 0 sees the same inputs either way; layer 1's inputs differ.
    assert records["original"][0] == records["merged"][0]
    assert records["original"][1]["frequencies"] != records["merged"][1]["frequencies"]


def test_bfloat16_compute_keeps_the_groups_and_is_recorded(tmp_path, calib_text):
    """bf16 products with fp32 statistics: the same HC-SMoE groups as fp32 on the CPU, and
    hcconvert.json says how the run computed."""
    src = save_tiny_mixtral(tmp_path / "src")
    records = {}
    for dtype in ("float32", "bfloat16"):
        options = ConvertOptions(experts=3, method="merge", calib=str(calib_text),
                                 calib_samples=4, seq_len=64, compute_dtype=dtype)
        convert(str(src), tmp_path / dtype, options, progress=False)
        records[dtype] = json.loads((tmp_path / dtype / "hcconvert.json").read_text())
        assert records[dtype]["run"] == {"device": "cpu", "dtype": dtype, "kernel": "torch"}
    groups = {d: [entry["groups"] for entry in r["layers"]] for d, r in records.items()}
    assert groups["bfloat16"] == groups["float32"]


@pytest.mark.parametrize("fast", [True, False], ids=["amx", "no-amx"])
def test_auto_computes_in_half_precision_where_the_cpu_multiplies_it_fast(
        tmp_path, calib_text, monkeypatch, fast):
    """auto: a bf16 checkpoint computes in bf16 on a CPU with a matrix unit for it, in fp32
    on one without; fp32 checkpoints in fp32; an explicit dtype always wins."""
    monkeypatch.setattr(decoder, "half_is_fast", lambda dtype: fast)
    cpu = torch.device("cpu")
    assert compute_dtype(cpu, torch.bfloat16) == (torch.bfloat16 if fast else torch.float32)
    assert compute_dtype(cpu, torch.float32) == torch.float32
    assert compute_dtype(cpu, torch.bfloat16, "float32") == torch.float32
    assert compute_dtype(torch.device("cuda"), torch.float16) == torch.float16
    src = save_tiny_mixtral(tmp_path / "src", dtype=torch.bfloat16)
    options = ConvertOptions(experts=4, method="merge", calib=str(calib_text),
                             calib_samples=4, seq_len=32)
    convert(str(src), tmp_path / "out", options, progress=False)
    run = json.loads((tmp_path / "out" / "hcconvert.json").read_text())["run"]
    assert run["dtype"] == ("bfloat16" if fast else "float32")


def test_a_torch_without_the_matrix_unit_probe_counts_as_none(monkeypatch):
    # half_is_fast as imported here is the real one (conftest stands in for the module's).
    monkeypatch.setitem(decoder.CPU_MATRIX_UNIT, torch.bfloat16, "_no_such_probe")
    assert not half_is_fast(torch.bfloat16)


def test_the_summary_times_the_reads(tmp_path, calib_text):
    """The read stage is the background reads' own time, not only the wait for them."""
    src = save_tiny_mixtral(tmp_path / "src")
    conversion = convert(str(src), tmp_path / "out",
                         ConvertOptions(experts=3, calib=str(calib_text), calib_samples=2,
                                        seq_len=32, method="hc-smoe"), progress=False)
    assert conversion.timer.seconds["read"] > 0
    assert "read wait" in conversion.timer.seconds
