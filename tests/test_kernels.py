"""Kernels chosen by measuring them: every candidate computes the same network, a
choice can be forced, and the cache of choices is keyed, written whole and survives
being broken.

Nothing here asserts on time: measuring is checked by what it decides and records.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_int8_close, assert_rows_match_alone, fresh_logits, ok, one_line_error, text_ids
from wmgen import kernels
from wmgen.cli import app
from wmgen.errors import UsageError
from wmgen.formats import Int8Linear, Linear, contiguous, convert, int8_available, quantized_engine
from wmgen.memory import WorkingMemory
from wmgen.model import load_model, load_tokenizer
from wmgen.settings import kernel_cache

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLOAT_HERE = Linear.kernels(torch.device("cpu"), torch.float32)
INT8_HERE = Int8Linear.kernels() if int8_available() else ()


def load(tiny_dir, dtype: str = "float32", **options):
    info, _ = load_tokenizer(str(tiny_dir))
    return load_model(info, device="cpu", dtype=dtype, **options)


@pytest.fixture
def measured_here(monkeypatch):
    """Measure even the tiny model, and take the machine for a quiet one (whatever
    else runs beside the tests), so that a measurement is always kept."""
    monkeypatch.setattr(kernels, "SMALL_WEIGHTS", 0)
    monkeypatch.setattr(kernels, "threads_share", lambda: 1.0)


@torch.inference_mode()
def stepped_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits after each of `ids[3:]`: the first four read at once, then one token a step."""
    memory = WorkingMemory(model, 64)
    rows = [memory.read(ids[:4])[0]]
    rows += [memory.append(token) for token in ids[4:]]
    return torch.stack(rows)


# --- every candidate computes the same network ------------------------------------------


@pytest.mark.parametrize("kernel", FLOAT_HERE)
def test_every_float_kernel_gives_the_logits_of_transformers(tiny_dir, hf_model, loaded, kernel):
    model = load(tiny_dir, forced_kernels=(kernel,))
    assert model.kernels.how == "forced"
    assert {b.c_fc.kernel for b in model.blocks} == {kernel}
    assert model._head.kernel == (kernel if kernel != "packed" else "addmm"), "a packed head could not give embeddings"
    ids = loaded[1].encode("The lighthouse keeper climbed the stairs every evening.")
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0, 3:]
    torch.testing.assert_close(stepped_logits(model, ids), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.embed(torch.tensor(ids)), hf_model.transformer.wte.weight[ids], atol=0, rtol=0)
    assert model.nbytes == sum(p.nbytes for p in hf_model.parameters()), "one copy of every weight, whatever the kernel"


@pytest.mark.parametrize("rows, cols", [(1, 1), (5, 3), (64, 7), (65, 130), (200, 64), (1000, 33)])
def test_a_transposed_matrix_is_laid_out_in_row_major_order_element_for_element(rows, cols):
    source = torch.randn(rows, cols)
    copied = contiguous(source.t())
    assert copied.is_contiguous() and copied.shape == (cols, rows)
    assert torch.equal(copied, source.t())
    assert contiguous(source) is source, "a row-major matrix is used in place"
    strided = source[:, ::2]
    assert torch.equal(contiguous(strided), strided) and contiguous(strided).is_contiguous()


def test_conversions_two_at_a_time_come_back_in_order_and_let_each_source_go():
    import gc
    import weakref

    class Source:
        def __init__(self, n):
            self.n = n

    sources = [Source(n) for n in range(9)]
    watched = [weakref.ref(s) for s in sources]
    jobs = [(n, f"part{n}", source) for n, source in enumerate(sources)]
    del sources
    done = convert(jobs, lambda source: source.n * 10, threads=2)
    assert done == [(n, f"part{n}", n * 10) for n in range(9)]
    assert jobs == [None] * 9
    gc.collect()
    assert all(ref() is None for ref in watched), "no conversion keeps its source"


def test_a_failed_conversion_raises_in_the_caller():
    def work(n):
        if n == 5:
            raise ValueError("cannot convert 5")
        return n

    with pytest.raises(ValueError, match="cannot convert 5"):
        convert([(n, n) for n in range(8)], work, threads=2)


@pytest.mark.skipif(len(INT8_HERE) < 2 or "onednn" not in INT8_HERE, reason="needs a second quantized engine")
def test_the_quantized_engine_is_set_back_as_it_was():
    before = torch.backends.quantized.engine
    other = "onednn" if before != "onednn" else "fbgemm"
    with quantized_engine(other):
        assert torch.backends.quantized.engine == other
    assert torch.backends.quantized.engine == before
    with pytest.raises(RuntimeError), quantized_engine(other):
        raise RuntimeError("packing failed")
    assert torch.backends.quantized.engine == before


@pytest.mark.parametrize("kernel", INT8_HERE)
def test_every_int8_kernel_stays_within_the_int8_bounds_of_float32(tiny_dir, loaded, kernel):
    exact_model, tokenizer, _ = loaded
    model = load(tiny_dir, "int8", forced_kernels=(kernel,))
    assert {b.c_attn.kernel for b in model.blocks} == {kernel} and model._head.kernel == kernel
    ids = text_ids(tokenizer, exact_model.config.n_positions)
    assert_int8_close(fresh_logits(exact_model, ids), fresh_logits(model, ids))
    assert model.nbytes < 0.6 * exact_model.nbytes


@pytest.mark.parametrize("dtype, kernel", [("float32", k) for k in FLOAT_HERE] + [("int8", k) for k in INT8_HERE])
def test_with_every_kernel_batched_rows_get_what_they_get_alone(tiny_dir, loaded, dtype, kernel):
    model, tokenizer, _ = loaded
    assert_rows_match_alone(load(tiny_dir, dtype, forced_kernels=(kernel,)), tokenizer)


def test_a_kernel_with_other_results_is_never_chosen_however_fast(measured_here):
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(64, 32, generator=g), torch.randn(32, generator=g)) for _ in range(3)]
    slow_and_right = lambda w, b: lambda x: [torch.addmm(b, x, w) for _ in range(20)][-1]  # noqa: E731
    fast_and_wrong = lambda w, b: lambda x: x @ w  # noqa: E731 (no bias)
    role = kernels.Role("64x32", ("right", "wrong"), 64, lambda: weights,
                        lambda kernel, w, b: (slow_and_right if kernel == "right" else fast_and_wrong)(w, b), 1e-5)
    timings, _, _ = kernels.measure_roles([role])
    assert set(timings["64x32"]) == {"right"}


# --- forcing ----------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("linear", ("linear",)), ("packed", ("packed",)), ("int8pack", ("int8pack",)),
    ("linear,onednn", ("linear", "onednn")), (" fbgemm , addmm ", ("fbgemm", "addmm")),
])
def test_kernel_choices_that_parse(text, expected):
    assert kernels.parse(text) == expected


@pytest.mark.parametrize("text", ["fast", "LINEAR", "linear,", "addmm,linear", "fbgemm,onednn", "linear,onednn,addmm", "a\nb"])
def test_kernel_choices_that_do_not_parse_name_the_variable_and_the_kernels(text):
    with pytest.raises(UsageError) as e:
        kernels.parse(text)
    message = str(e.value)
    assert message.startswith("WMGEN_KERNELS: ") and "\n" not in message
    assert all(name in message for name in kernels.FLOAT + kernels.INT8)


def test_forcing_through_the_variable_runs_that_kernel_and_says_so(tiny_dir, monkeypatch):
    monkeypatch.setenv("WMGEN_KERNELS", "linear,int8pack" if "int8pack" in INT8_HERE else "linear")
    args = ["generate", "hello", "-m", str(tiny_dir), "-n", "3", "-t", "0", "--no-save", "--stats", "--debug"]
    result = runner.invoke(app, args)
    assert ok(result).strip()
    line = [x for x in result.stderr.splitlines() if x.startswith("kernels: ")]
    assert line == ["kernels: float32 64x192 linear · 64x64 linear · 64x256 linear · 256x64 linear · "
                    f"head 64x{load_tokenizer(str(tiny_dir))[0].vocab_size} linear (forced) · keys and values float32"], result.stderr
    if "int8pack" in INT8_HERE:
        result = runner.invoke(app, [*args, "--dtype", "int8"])
        assert ok(result).strip() and "kernels: int8 64x192 int8pack · " in result.stderr and "(forced)" in result.stderr


def test_a_bad_kernel_choice_is_a_one_line_usage_error(tiny_dir, monkeypatch):
    monkeypatch.setenv("WMGEN_KERNELS", "fastest")
    line = one_line_error(runner.invoke(app, ["generate", "hello", "-m", str(tiny_dir), "--no-save"]), 2)
    assert line.startswith("wmgen: error: WMGEN_KERNELS: 'fastest' is not a kernel choice"), line
    assert "addmm, linear, packed, fbgemm, onednn, int8pack" in line


def test_a_forced_kernel_that_cannot_run_here_is_a_one_line_usage_error(tiny_dir, monkeypatch):
    monkeypatch.setattr(Linear, "PACK", False)  # as where torch has no oneDNN
    monkeypatch.setenv("WMGEN_KERNELS", "packed")
    line = one_line_error(runner.invoke(app, ["generate", "hello", "-m", str(tiny_dir), "--no-save"]), 2)
    assert line == "wmgen: error: the forced kernel 'packed' does not run float32 weights here; use one of addmm, linear"


def test_the_library_forces_kernels_with_an_argument_and_checks_it(tiny_dir):
    import wmgen

    assert wmgen.load(str(tiny_dir), kernels="linear").kernels.how == "forced"
    with pytest.raises(UsageError, match="^kernels: 'quick' is not a kernel choice"):
        wmgen.load(str(tiny_dir), kernels="quick")


def test_a_kernel_of_the_other_kind_leaves_the_choice_to_measuring(tiny_dir):
    model = load(tiny_dir, forced_kernels=("fbgemm",))  # an int8 kernel, for a float32 model
    assert model.kernels.how == "default" and "small" in model.kernels.note


# --- measuring and the cache ---------------------------------------------------------------


def test_a_measured_choice_is_saved_and_read_back_the_next_time(tiny_dir, tmp_path, measured_here):
    cache = tmp_path / "cache" / "kernels.json"
    first = load(tiny_dir, kernel_cache=cache)
    assert first.kernels.how == "measured" and first.kernels.saved and not first.kernels.note
    assert set(first.kernels.timings) == set(first.kernels.kernels)
    assert all(first.kernels.timings[key][kernel] > 0 for key, kernel in first.kernels.kernels.items())
    data = json.loads(cache.read_text())
    assert data["version"] == 1 and len(data["kernels"]) == 5
    assert all(key.startswith(kernels.machine_key("float32")) for key in data["kernels"])
    second = load(tiny_dir, kernel_cache=cache)
    assert second.kernels.how == "cached" and second.kernels.kernels == first.kernels.kernels
    assert [p.name for p in cache.parent.iterdir()] == ["kernels.json"], "a temporary file was left behind"


def test_the_cached_choice_is_the_one_used(tiny_dir, tmp_path, measured_here):
    cache = tmp_path / "kernels.json"
    keys = load(tiny_dir, kernel_cache=cache).kernels.kernels
    prefix = kernels.machine_key("float32")
    cache.write_text(json.dumps({"version": 1, "kernels": {f"{prefix} · {key}": {"kernel": "linear"} for key in keys}}))
    model = load(tiny_dir, kernel_cache=cache)
    assert model.kernels.how == "cached" and set(model.kernels.kernels.values()) == {"linear"}
    assert {b.c_attn.kernel for b in model.blocks} == {"linear"} and model._head.kernel == "linear"


@pytest.mark.parametrize("change", ["cpu", "vector extensions", "threads", "torch", "dtype"])
def test_another_machine_thread_count_torch_or_dtype_measures_again(tiny_dir, tmp_path, measured_here, monkeypatch, change):
    cache = tmp_path / "kernels.json"
    load(tiny_dir, kernel_cache=cache)
    if change == "cpu":
        monkeypatch.setattr(kernels, "cpu_model", lambda: "Another CPU")
    elif change == "vector extensions":  # some virtual machines give CPUs of two generations one name
        flags = kernels.cpu_flags()
        monkeypatch.setattr(kernels, "cpu_flags", lambda: flags ^ {"avx512f"})
    elif change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    dtype = "int8" if change == "dtype" else "float32"
    if dtype == "int8" and not INT8_HERE:
        pytest.skip("no int8 kernels in this torch")
    again = load(tiny_dir, dtype, kernel_cache=cache)
    assert again.kernels.how == "measured" and again.kernels.saved
    weights = [key for key in json.loads(cache.read_text())["kernels"] if "keys and values" not in key]
    assert len(weights) == 10, "the first machine's entries are kept beside the new ones"
    assert load(tiny_dir, dtype, kernel_cache=cache).kernels.how == "cached"


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe\x00garbage", b"", b"[1, 2, 3]", b'{"version": 99, "kernels": {}}',
    b'{"version": 1, "kernels": []}', b'{"version": 1, "kernels": {"x": 1}}',
])
def test_a_broken_cache_file_is_ignored_and_replaced(tiny_dir, tmp_path, measured_here, content):
    cache = tmp_path / "kernels.json"
    cache.write_bytes(content)
    model = load(tiny_dir, kernel_cache=cache)
    assert model.kernels.how == "measured" and model.kernels.saved
    assert len(json.loads(cache.read_text())["kernels"]) >= 5
    assert load(tiny_dir, kernel_cache=cache).kernels.how == "cached"


def test_a_cached_kernel_that_no_longer_runs_is_measured_again(tiny_dir, tmp_path, measured_here, monkeypatch):
    cache = tmp_path / "kernels.json"
    keys = load(tiny_dir, kernel_cache=cache).kernels.kernels
    prefix = kernels.machine_key("float32")
    cache.write_text(json.dumps({"version": 1, "kernels": {f"{prefix} · {key}": {"kernel": "packed"} for key in keys}}))
    monkeypatch.setattr(Linear, "PACK", False)
    model = load(tiny_dir, kernel_cache=cache)
    assert model.kernels.how == "measured" and "packed" not in model.kernels.kernels.values()


def test_a_cache_that_cannot_be_written_costs_only_the_saving(tiny_dir, tmp_path, measured_here):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    model = load(tiny_dir, kernel_cache=blocker / "kernels.json")
    assert model.kernels.how == "measured" and not model.kernels.saved
    assert model.kernels.note.startswith(f"not saved in {blocker / 'kernels.json'}")


def test_a_cache_path_that_is_a_folder_is_survived(tiny_dir, tmp_path, measured_here):
    cache = tmp_path / "kernels.json"
    cache.mkdir()
    model = load(tiny_dir, kernel_cache=cache)
    assert model.kernels.how == "measured" and not model.kernels.saved
    assert model.kernels.note.startswith(f"ignored {cache}: is a folder") and f"not saved in {cache}" in model.kernels.note


def test_a_busy_machine_gets_the_defaults_and_saves_nothing(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "SMALL_WEIGHTS", 0)
    monkeypatch.setattr(kernels, "threads_share", lambda: 0.5)
    cache = tmp_path / "kernels.json"
    model = load(tiny_dir, kernel_cache=cache)
    assert model.kernels.how == "measured" and "busy" in model.kernels.note
    assert set(model.kernels.kernels.values()) == {"addmm"} and not cache.exists()


def test_a_small_model_is_not_measured(tiny_dir, tmp_path):
    model = load(tiny_dir, kernel_cache=tmp_path / "kernels.json")
    assert model.kernels.how == "default" and set(model.kernels.kernels.values()) == {"addmm"}
    assert not (tmp_path / "kernels.json").exists()


# --- the dtype keys and values are stored in ----------------------------------------------


def slowed_store(monkeypatch, slow: str, repeats: int = 30) -> None:
    """Attention over a store in `slow` made many times longer (it runs `repeats`
    times), the other as measured."""
    real = kernels._attention

    def build(dtype, keys, values):
        attend = real(dtype, keys, values)
        return (lambda x: [attend(x) for _ in range(repeats)][-1]) if dtype == slow else attend

    monkeypatch.setattr(kernels, "_attention", build)


@pytest.mark.parametrize("slow", kernels.STORES)
def test_keys_and_values_are_stored_in_the_dtype_whose_attention_measures_faster(tmp_path, measured_here, monkeypatch, slow):
    slowed_store(monkeypatch, slow)
    cache = tmp_path / "kernels.json"
    first = kernels.store_dtype(4, 16, 128, cache)
    faster = next(d for d in kernels.STORES if d != slow)
    assert first.how == "measured" and first.saved and first.kernels == {"attention 4x16x128": faster}
    assert first.timings["attention 4x16x128"][slow] > first.timings["attention 4x16x128"][faster]
    again = kernels.store_dtype(4, 16, 128, cache)
    assert again.how == "cached" and again.kernels == first.kernels
    assert kernels.store_dtype(4, 16, 64, cache).how == "measured", "another shape is measured on its own"


def test_a_store_dtype_whose_attention_is_wrong_is_never_chosen_however_fast(tmp_path, measured_here, monkeypatch):
    slowed_store(monkeypatch, "float32")
    real = kernels._attention
    monkeypatch.setattr(kernels, "_attention", lambda dtype, k, v: (lambda x: real(dtype, k, v)(x) * 2) if dtype == "bfloat16" else real(dtype, k, v))
    choice = kernels.store_dtype(4, 16, 128, tmp_path / "kernels.json")
    assert choice.kernels == {"attention 4x16x128": "float32"} and set(choice.timings["attention 4x16x128"]) == {"float32"}


def test_a_busy_machine_stores_float32_and_saves_no_store_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "threads_share", lambda: 0.5)
    slowed_store(monkeypatch, "float32")
    choice = kernels.store_dtype(4, 16, 128, tmp_path / "kernels.json")
    assert choice.kernels == {"attention 4x16x128": "float32"} and "busy" in choice.note
    assert not (tmp_path / "kernels.json").exists()


def test_without_native_bfloat16_quantized_weights_store_float32_without_measuring(monkeypatch):
    from wmgen import model as loader

    monkeypatch.setattr(loader, "KV_BFLOAT16", False)
    monkeypatch.setattr(kernels, "store_dtype", lambda *a: pytest.fail("measured where bfloat16 is not native"))
    assert loader.kv_dtype("int8", "cpu", (4, 16, 128)) == loader.kv_dtype("int4", "cpu", (4, 16, 128)) == "float32"
    assert loader.kv_dtype("float32", "cpu", (4, 16, 128)) == "float32" and loader.kv_dtype("bfloat16", "cpu", (4, 16, 128)) == "bfloat16"


# --- the command line --------------------------------------------------------------------


def test_stats_with_debug_say_which_kernels_ran_and_how_they_were_chosen(tiny_dir, measured_here, monkeypatch):
    args = ["generate", "hello", "-m", str(tiny_dir), "-n", "3", "-t", "0", "--no-save", "--stats"]
    first, second = runner.invoke(app, [*args, "--debug"]), runner.invoke(app, [*args, "--debug"])
    cache = kernel_cache(os.environ)
    assert "(measured now in " in first.stderr and f"saved in {cache})" in first.stderr, first.stderr
    assert f"(read from {cache})" in second.stderr, second.stderr
    without = runner.invoke(app, args)
    assert ok(first) == ok(second) == ok(without), "the report goes to stderr"
    assert "kernels:" not in without.stderr and "tokens/s" in without.stderr, "the kernels only with --debug"
    monkeypatch.setenv("WMGEN_DEBUG", "1")
    line = next(x for x in runner.invoke(app, args).stderr.splitlines() if x.startswith("kernels:"))
    assert line.startswith("kernels: float32 64x192 ") and line.endswith(" · keys and values float32"), line
