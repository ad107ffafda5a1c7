"""Every job is one library call. Oracles: the CLI's own output directory (byte-equal weights,
equal lorq.json), logits of the reloaded models, and the provenance each artifact carries."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import Hostile
from test_cli import one_line_error, run, tiny_dir  # noqa: F401  (the module-scoped fixture)

import lorq
from lorq.calibrate.tokens import Calibration


def lorq_json(path, timings: bool = True):
    """lorq.json of ``path`` (without the plan's wall-clock timings unless ``timings``)."""
    meta = json.loads((path / "lorq.json").read_text())
    if not timings and meta.get("plan"):
        meta["plan"] = {k: v for k, v in meta["plan"].items() if not k.endswith("_seconds")}
    return meta


def test_python_compress_and_save_equal_the_cli(tiny_dir, tmp_path):  # noqa: F811
    cli, library = tmp_path / "cli", tmp_path / "lib"
    args = ("--rank", "4", "--budget", "3.0", "--candidates", "nf2,nf3,nf4", "--eval-blocks", "1")
    result = run("compress", "--model", tiny_dir, *args, "--out", cli)
    assert result.exit_code == 0, result.output
    from lorq.config import JOB_STATISTICS  # the CLI's defaults; a hand-built config is data-free

    # and for a budget on a causal LM the CLI plans with Fisher costs
    defaults = {**JOB_STATISTICS, "plan_weighting": "fisher"}
    config = lorq.CompressConfig(rank=4, budget=3.0, candidates="nf2,nf3,nf4", **defaults)
    compressed = lorq.compress_model(str(tiny_dir), config, eval_blocks=1)
    lorq.save(compressed, library)
    assert (cli / "model.safetensors").read_bytes() == (library / "model.safetensors").read_bytes()
    assert lorq_json(cli, timings=False) == lorq_json(library, timings=False)
    meta = lorq_json(library)
    assert meta["source"]["model"] == str(tiny_dir) and meta["compress"]["budget"] == 3.0
    assert meta["plan"]["budget"] == 3.0 and meta["evaluation"]["kl"] > 0
    labels = [m.label for m in compressed.measurements]
    assert labels[0] == "original" and labels[1].startswith("plain NF") and "(3.0 bits" in labels[2]


def test_a_loaded_model_compresses_in_place_without_evaluation(tiny_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = lorq.CompressConfig(method="plain", quant="int4-g32", rank=2)
    result = lorq.compress_model(model, config, tokenizer=tokenizer, eval_blocks=0)
    assert result.model is model and result.measurements == ()
    assert result.metadata["compress"]["quant"] == "int4-g32"
    with pytest.raises(ValueError, match="tokenizer="):
        lorq.compress_model(AutoModelForCausalLM.from_pretrained(tiny_dir), config)


def test_quant_accepts_a_config_object(tiny_dir, tmp_path):  # noqa: F811
    from lorq.quant import IntConfig

    config = lorq.CompressConfig(method="plain", quant=IntConfig(bits=3, block_size=16), rank=2)
    result = lorq.compress_model(str(tiny_dir), config, eval_blocks=0)
    lorq.save(result, tmp_path / "m")
    back = lorq.CompressConfig.from_dict(lorq_json(tmp_path / "m")["compress"])
    assert back == config


def test_merge_and_export_carry_the_provenance(tiny_dir, tmp_path):  # noqa: F811
    config = lorq.CompressConfig(method="qa-lora", quant="int4-g32", rank=2)
    lorq.save(lorq.compress_model(str(tiny_dir), config, eval_blocks=0), tmp_path / "qa")
    model = lorq.load(tmp_path / "qa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)
    merged = lorq.merge(model)
    assert (
        merged.quantized
        and set(merged.errors)
        and not any(getattr(m, "has_lora", False) for m in merged.model.modules())
    )
    merged.save(tmp_path / "merged")
    meta = lorq_json(tmp_path / "merged")
    assert meta["source"]["model"] == str(tiny_dir) and meta["merge"]["kind"] == "quantized"
    with pytest.raises(ValueError, match="already merged"):
        lorq.merge(lorq.load(tmp_path / "merged"))
    dense = lorq.merge(model, dequantize=True)
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(dense.model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    exported = lorq.export(lorq.load(tmp_path / "merged"), tmp_path / "gptq", "gptq")
    assert (exported.path / "model.safetensors").exists()
    assert set(lorq.export_targets()) == {"peft", "hf", "gguf", "gptq", "bnb"}


def test_finetune_resumes_with_the_same_settings(tiny_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    from lorq.jobs.finetune import checkpoint_dir, prepare_checkpoints

    config = lorq.CompressConfig(rank=2, quant="nf4")
    lorq.save(lorq.compress_model(str(tiny_dir), config, eval_blocks=0), tmp_path / "m")
    train = lorq.FinetuneConfig(steps=2, seq_len=32, batch_size=2, save_every=1, trainable=[])
    out = tmp_path / "ft"
    folder, _ = prepare_checkpoints(out, train, resume=True)
    with_trainable = replace(train, trainable=("norm",))
    prepare_checkpoints(out, with_trainable, resume=True)  # no checkpoint yet: a fresh start
    prepare_checkpoints(out, train, resume=True)
    (folder / "checkpoint-1").mkdir()  # from here on there is something to resume
    _, changes = prepare_checkpoints(out, train, resume=True)  # a list read back is the same
    assert changes == []
    with pytest.raises(ValueError, match="other trainable"):
        prepare_checkpoints(out, with_trainable, resume=True)
    smaller = replace(train, lr=1e-5)  # e.g. after a NaN stop: allowed and recorded
    assert prepare_checkpoints(out, smaller, resume=True)[1] == [{"lr": [2e-4, 1e-5]}]
    assert prepare_checkpoints(out, train, resume=True)[1][-1] == {"lr": [1e-5, 2e-4]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    with pytest.warns(UserWarning, match="checkpoint-1 is incomplete"):  # it has no marker
        result = lorq.finetune(lorq.load(tmp_path / "m"), tokenizer, train, out, source="m")
    assert result.steps == 2 and not checkpoint_dir(out).exists()
    meta = lorq_json(out)
    assert meta["finetune"]["from"] == "m" and meta["compress"]["quant"] == "nf4"
    assert len(meta["finetune"]["changed_on_resume"]) == 2


def test_calibration_is_validated_before_work():
    with pytest.raises(ValueError, match="seq_len=0"):
        Calibration("builtin", seq_len=0)


def test_eval_finds_a_relative_source_from_anywhere_and_never_asks_the_hub(
    tiny_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from lorq.jobs.evaluate import evaluate_saved

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr("lorq.io.models.hub_reachable", no_hub)
    monkeypatch.chdir(tiny_dir.parent)
    config = lorq.CompressConfig(rank=2, quant="nf4")
    lorq.save(lorq.compress_model(tiny_dir.name, config, eval_blocks=0), tmp_path / "m")
    assert lorq_json(tmp_path / "m")["source"]["path"] == tiny_dir.name  # relative, as given
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded working directory resolves it
    rows, missing = evaluate_saved(tmp_path / "m", eval_blocks=1)
    assert missing is None and rows[0].label == "original"
    meta = lorq_json(tmp_path / "m")
    meta["source"]["cwd"] = str(tmp_path / "gone")  # the source moved away: no KL, no hub
    (tmp_path / "m" / "lorq.json").write_text(json.dumps(meta))
    rows, missing = evaluate_saved(tmp_path / "m", eval_blocks=1)
    assert len(rows) == 1 and "not on this machine" in missing


def test_a_resume_with_a_smaller_lr_trains_at_that_lr(tiny_dir, tmp_path):  # noqa: F811
    """As after a NaN stop: the first run's checkpoint-2, continued to step 4 at a tenth of the
    lr. Oracle: the optimizer state in checkpoint-4 has lr = new lr × the schedule's factor at
    step 4, the factor computed by transformers' own scheduler."""
    from transformers import AutoTokenizer, get_scheduler

    config = lorq.CompressConfig(rank=2, quant="nf4")
    lorq.save(lorq.compress_model(str(tiny_dir), config, eval_blocks=0), tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    first = lorq.FinetuneConfig(
        steps=2, seq_len=32, batch_size=2, save_every=2, eval_blocks=1, warmup=0.0
    )
    out, options = tmp_path / "ft", dict(keep_checkpoints=True, overwrite=True)
    lorq.finetune(lorq.load(tmp_path / "m"), tokenizer, first, out, **options)
    second = replace(first, steps=6, lr=first.lr / 10)
    result = lorq.finetune(lorq.load(tmp_path / "m"), tokenizer, second, out, **options)
    assert result.resumed_from.endswith("checkpoint-2")
    state = torch.load(out.with_name("ft-checkpoints") / "checkpoint-4" / "optimizer.pt")
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = get_scheduler("cosine", dummy, num_warmup_steps=0, num_training_steps=6).lr_lambdas[0]
    assert factor(4) > 0.1
    assert state["param_groups"][0]["lr"] == pytest.approx(second.lr * factor(4), rel=1e-6)
    changed = lorq_json(out)["finetune"]["changed_on_resume"]
    assert changed == [{"steps": [2, 6], "lr": [first.lr, second.lr]}]


@pytest.mark.parametrize("file", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_hostile_checkpoint_file_is_refused_without_running(file, tiny_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    config = lorq.CompressConfig(rank=2, quant="nf4")
    lorq.save(lorq.compress_model(str(tiny_dir), config, eval_blocks=0), tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    train = lorq.FinetuneConfig(steps=2, seq_len=32, batch_size=2, save_every=2, eval_blocks=1)
    out, options = tmp_path / "ft", dict(keep_checkpoints=True, overwrite=True)
    lorq.finetune(lorq.load(tmp_path / "m"), tokenizer, train, out, **options)
    checkpoint = out.with_name("ft-checkpoints") / "checkpoint-2"
    torch.save({"state": Hostile(tmp_path / "RAN")}, checkpoint / file)
    more = replace(train, steps=4)
    with pytest.raises(ValueError, match="checkpoint-2 holds a file that is corrupted or more"):
        lorq.finetune(lorq.load(tmp_path / "m"), tokenizer, more, out, **options)
    assert not (tmp_path / "RAN").exists()


def test_a_second_finetune_into_the_same_output_is_refused(tiny_dir, tmp_path):  # noqa: F811
    import threading

    from lorq.util.atomic import exclusive

    config = lorq.CompressConfig(rank=2, quant="nf4")
    lorq.save(lorq.compress_model(str(tiny_dir), config, eval_blocks=0), tmp_path / "m")
    held, release = threading.Event(), threading.Event()

    def first_job():  # stands for a fine-tune running in another process
        with exclusive(tmp_path / "ft"):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=first_job)
    thread.start()
    held.wait(30)
    try:
        with pytest.raises(ValueError, match="being written by another lorq process"):
            lorq.finetune(lorq.load(tmp_path / "m"), None, lorq.FinetuneConfig(), tmp_path / "ft")
    finally:
        release.set()
        thread.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no checkpoints, no lock left
